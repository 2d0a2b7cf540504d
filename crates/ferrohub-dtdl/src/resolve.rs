//! A set of parsed interfaces, and resolution of one model id to what a device implementing it
//! has: its contents with everything `extends` brings, schema references replaced by the
//! schemas they name, and each component's interface resolved the same way.
//!
//! IoT Plug and Play rule on top of DTDL: a component's interface has no components of its own
//! (the conventions address a property as `component.property`, one level only).

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::dtmi::Dtmi;
use crate::model::*;
use crate::parse::{parse_document, DtdlError};

/// How long a chain of `extends` or of schema references may be.
const MAX_CHAIN: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ResolveError {
    #[error("the model {0} is not in the repository")]
    NotFound(Dtmi),
    #[error("{missing} is not in the repository (needed by {by})")]
    MissingDependency { missing: Dtmi, by: Dtmi },
    #[error("{0} is already stored with other contents; a DTMI names one immutable version, so a changed model needs a new version")]
    Conflict(Dtmi),
    #[error("{id} extends itself through {chain}")]
    Cycle { id: Dtmi, chain: String },
    #[error("{0}: 'extends' or schema references go more than 10 levels deep")]
    TooDeep(Dtmi),
    #[error("{interface}: the name '{name}' comes twice (once through 'extends')")]
    DuplicateName { interface: Dtmi, name: String },
    #[error("{model}: the component '{component}' uses {interface}, which has components of its own; IoT Plug and Play allows one level of components")]
    NestedComponent {
        model: Dtmi,
        component: String,
        interface: Dtmi,
    },
    #[error("{by}: the schema {schema} is not declared in any interface's 'schemas'")]
    SchemaNotFound { schema: Dtmi, by: Dtmi },
}

/// Interfaces by id.
#[derive(Debug, Clone, Default)]
pub struct ModelSet {
    interfaces: BTreeMap<Dtmi, Interface>,
}

/// One interface's contents as a device has them: its own and those its `extends` bring,
/// schemas resolved.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolved {
    pub telemetry: BTreeMap<String, Telemetry>,
    pub properties: BTreeMap<String, Property>,
    pub commands: BTreeMap<String, Command>,
}

/// A model id resolved: the default component's contents and each component's.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub id: Dtmi,
    pub root: Resolved,
    /// By component name: the component's interface id and its contents.
    pub components: BTreeMap<String, (Dtmi, Resolved)>,
}

impl Model {
    /// The contents of a component, or of the default component for `None`.
    pub fn part(&self, component: Option<&str>) -> Option<&Resolved> {
        match component {
            None => Some(&self.root),
            Some(c) => self.components.get(c).map(|(_, r)| r),
        }
    }

    pub fn telemetry(&self, component: Option<&str>, name: &str) -> Option<&Telemetry> {
        self.part(component)?.telemetry.get(name)
    }

    pub fn property(&self, component: Option<&str>, name: &str) -> Option<&Property> {
        self.part(component)?.properties.get(name)
    }

    pub fn command(&self, component: Option<&str>, name: &str) -> Option<&Command> {
        self.part(component)?.commands.get(name)
    }
}

impl ModelSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an interface. The same id with other contents is a [`ResolveError::Conflict`]: a
    /// DTMI names one immutable version.
    pub fn insert(&mut self, interface: Interface) -> Result<(), ResolveError> {
        match self.interfaces.get(&interface.id) {
            Some(existing) if *existing != interface => {
                Err(ResolveError::Conflict(interface.id.clone()))
            }
            Some(_) => Ok(()),
            None => {
                self.interfaces.insert(interface.id.clone(), interface);
                Ok(())
            }
        }
    }

    /// Parses a document and adds its interfaces; returns their ids, the document's own
    /// (top-level) ones first. A conflict is reported as a parse error at `$`.
    pub fn add_document(&mut self, text: &str) -> Result<Vec<Dtmi>, DtdlError> {
        let parsed = parse_document(text)?;
        let mut ids = Vec::new();
        for i in parsed {
            ids.push(i.id.clone());
            self.insert(i).map_err(|e| DtdlError {
                file: None,
                path: "$".into(),
                message: e.to_string(),
            })?;
        }
        Ok(ids)
    }

    pub fn get(&self, id: &Dtmi) -> Option<&Interface> {
        self.interfaces.get(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &Dtmi> {
        self.interfaces.keys()
    }

    /// Every interface `id` needs (itself, what it extends, its components' interfaces, and
    /// theirs), with those that are not in the set apart: the expanded form of a model is the
    /// first set, and it is complete when the second is empty.
    pub fn closure(&self, id: &Dtmi) -> (BTreeSet<Dtmi>, BTreeSet<Dtmi>) {
        let mut found = BTreeSet::new();
        let mut missing = BTreeSet::new();
        let mut todo = vec![id.clone()];
        while let Some(next) = todo.pop() {
            if found.contains(&next) || missing.contains(&next) {
                continue;
            }
            let Some(i) = self.interfaces.get(&next) else {
                missing.insert(next);
                continue;
            };
            found.insert(next);
            todo.extend(i.extends.iter().cloned());
            for c in &i.contents {
                if let Content::Component(comp) = c {
                    todo.push(comp.schema.clone());
                }
            }
        }
        (found, missing)
    }

    /// Resolves a model id (see the module notes).
    pub fn resolve(&self, id: &Dtmi) -> Result<Model, ResolveError> {
        if !self.interfaces.contains_key(id) {
            return Err(ResolveError::NotFound(id.clone()));
        }
        let schemas = self.declared_schemas();
        let mut components = BTreeMap::new();
        let mut root = Resolved::default();
        let mut names = BTreeSet::new();
        let mut component_list = Vec::new();
        self.flatten(
            id,
            id,
            &schemas,
            &mut root,
            &mut names,
            &mut component_list,
            &mut Vec::new(),
        )?;
        for comp in component_list {
            let mut part = Resolved::default();
            let mut inner = Vec::new();
            if !self.interfaces.contains_key(&comp.schema) {
                return Err(ResolveError::MissingDependency {
                    missing: comp.schema.clone(),
                    by: id.clone(),
                });
            }
            self.flatten(
                &comp.schema,
                &comp.schema,
                &schemas,
                &mut part,
                &mut BTreeSet::new(),
                &mut inner,
                &mut Vec::new(),
            )?;
            if !inner.is_empty() {
                return Err(ResolveError::NestedComponent {
                    model: id.clone(),
                    component: comp.name,
                    interface: comp.schema,
                });
            }
            components.insert(comp.name, (comp.schema, part));
        }
        Ok(Model {
            id: id.clone(),
            root,
            components,
        })
    }

    fn declared_schemas(&self) -> BTreeMap<&Dtmi, &Schema> {
        self.interfaces
            .values()
            .flat_map(|i| i.schemas.iter().map(|(id, s)| (id, s)))
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn flatten(
        &self,
        model: &Dtmi,
        id: &Dtmi,
        schemas: &BTreeMap<&Dtmi, &Schema>,
        out: &mut Resolved,
        names: &mut BTreeSet<String>,
        components: &mut Vec<Component>,
        chain: &mut Vec<Dtmi>,
    ) -> Result<(), ResolveError> {
        if chain.contains(id) {
            let mut text: Vec<String> = chain.iter().map(Dtmi::to_string).collect();
            text.push(id.to_string());
            return Err(ResolveError::Cycle {
                id: id.clone(),
                chain: text.join(" -> "),
            });
        }
        if chain.len() >= MAX_CHAIN {
            return Err(ResolveError::TooDeep(model.clone()));
        }
        let by = chain.last().unwrap_or(model).clone();
        let interface = self
            .interfaces
            .get(id)
            .ok_or_else(|| ResolveError::MissingDependency {
                missing: id.clone(),
                by,
            })?;
        chain.push(id.clone());
        for parent in &interface.extends {
            self.flatten(model, parent, schemas, out, names, components, chain)?;
        }
        chain.pop();
        for c in &interface.contents {
            if !names.insert(c.name().to_owned()) {
                return Err(ResolveError::DuplicateName {
                    interface: id.clone(),
                    name: c.name().to_owned(),
                });
            }
            let resolve = |s: &Schema| resolve_schema(s, schemas, id, 0);
            match c {
                Content::Telemetry(t) => {
                    let mut t = t.clone();
                    t.schema = resolve(&t.schema)?;
                    out.telemetry.insert(t.name.clone(), t);
                }
                Content::Property(p) => {
                    let mut p = p.clone();
                    p.schema = resolve(&p.schema)?;
                    out.properties.insert(p.name.clone(), p);
                }
                Content::Command(cmd) => {
                    let mut cmd = cmd.clone();
                    for payload in [&mut cmd.request, &mut cmd.response].into_iter().flatten() {
                        payload.schema = resolve(&payload.schema)?;
                    }
                    out.commands.insert(cmd.name.clone(), cmd);
                }
                Content::Component(comp) => components.push(comp.clone()),
                Content::Relationship { .. } => {}
            }
        }
        Ok(())
    }
}

fn resolve_schema(
    s: &Schema,
    schemas: &BTreeMap<&Dtmi, &Schema>,
    by: &Dtmi,
    depth: usize,
) -> Result<Schema, ResolveError> {
    if depth > MAX_CHAIN {
        return Err(ResolveError::TooDeep(by.clone()));
    }
    let again = |s: &Schema| resolve_schema(s, schemas, by, depth + 1);
    Ok(match s {
        Schema::Primitive(_) | Schema::Enum { .. } => s.clone(),
        Schema::Ref(id) => {
            let target = schemas
                .get(id)
                .ok_or_else(|| ResolveError::SchemaNotFound {
                    schema: id.clone(),
                    by: by.clone(),
                })?;
            again(target)?
        }
        Schema::Object { fields } => Schema::Object {
            fields: fields
                .iter()
                .map(|f| {
                    Ok(Field {
                        name: f.name.clone(),
                        schema: again(&f.schema)?,
                    })
                })
                .collect::<Result<_, ResolveError>>()?,
        },
        Schema::Map {
            key_name,
            value_name,
            value,
        } => Schema::Map {
            key_name: key_name.clone(),
            value_name: value_name.clone(),
            value: Box::new(again(value)?),
        },
        Schema::Array { element } => Schema::Array {
            element: Box::new(again(element)?),
        },
    })
}
