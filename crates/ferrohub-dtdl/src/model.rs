//! The parsed form of a DTDL interface: contents (telemetry, properties, commands, components,
//! relationships), schemas, semantic types and units. Only what IoT Plug and Play and the hub
//! use is kept; descriptions and display names stay in the stored document.

use serde_json::Value;

use crate::dtmi::Dtmi;

/// Which DTDL language version a document declares in its `@context`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DtdlVersion {
    V2,
    V3,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Interface {
    pub id: Dtmi,
    pub version: DtdlVersion,
    /// Extension contexts after the DTDL one (v3: `dtmi:dtdl:extension:quantitativeTypes;1`).
    pub extensions: Vec<Dtmi>,
    /// Interfaces this one extends, by id (inline ones are added to the model set).
    pub extends: Vec<Dtmi>,
    pub contents: Vec<Content>,
    /// Complex schemas declared for reuse (`schemas`), each with its `@id`.
    pub schemas: Vec<(Dtmi, Schema)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Telemetry(Telemetry),
    Property(Property),
    Command(Command),
    Component(Component),
    /// Relationships mean nothing to IoT Plug and Play devices; kept by name so that names
    /// stay unique across all contents.
    Relationship {
        name: String,
    },
}

impl Content {
    pub fn name(&self) -> &str {
        match self {
            Content::Telemetry(t) => &t.name,
            Content::Property(p) => &p.name,
            Content::Command(c) => &c.name,
            Content::Component(c) => &c.name,
            Content::Relationship { name } => name,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    pub name: String,
    pub schema: Schema,
    /// Co-types after `Telemetry` (`Temperature`), with the unit they allow.
    pub semantic_types: Vec<String>,
    pub unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    pub name: String,
    pub schema: Schema,
    pub writable: bool,
    pub semantic_types: Vec<String>,
    pub unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub name: String,
    pub request: Option<CommandPayload>,
    pub response: Option<CommandPayload>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommandPayload {
    pub name: String,
    pub schema: Schema,
    /// v3: whether `null` is a valid payload.
    pub nullable: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    pub name: String,
    /// The component's interface (an inline one is added to the model set under its `@id`).
    pub schema: Dtmi,
}

/// DTDL's primitive schemas; those after `Time` are v3 only, the geospatial ones v2 and v3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Primitive {
    Boolean,
    Date,
    DateTime,
    Double,
    Duration,
    Float,
    Integer,
    Long,
    String,
    Time,
    Byte,
    Bytes,
    Decimal,
    Short,
    Uuid,
    UnsignedByte,
    UnsignedInteger,
    UnsignedLong,
    UnsignedShort,
    Point,
    LineString,
    Polygon,
    MultiPoint,
    MultiLineString,
    MultiPolygon,
}

impl Primitive {
    /// The primitive a schema string names in `version`, if any.
    pub fn from_name(name: &str, version: DtdlVersion) -> Option<Self> {
        use Primitive::*;
        let p = match name {
            "boolean" => Boolean,
            "date" => Date,
            "dateTime" => DateTime,
            "double" => Double,
            "duration" => Duration,
            "float" => Float,
            "integer" => Integer,
            "long" => Long,
            "string" => String,
            "time" => Time,
            "point" => Point,
            "lineString" => LineString,
            "polygon" => Polygon,
            "multiPoint" => MultiPoint,
            "multiLineString" => MultiLineString,
            "multiPolygon" => MultiPolygon,
            _ if version == DtdlVersion::V2 => return None,
            "byte" => Byte,
            "bytes" => Bytes,
            "decimal" => Decimal,
            "short" => Short,
            "uuid" => Uuid,
            "unsignedByte" => UnsignedByte,
            "unsignedInteger" => UnsignedInteger,
            "unsignedLong" => UnsignedLong,
            "unsignedShort" => UnsignedShort,
            _ => return None,
        };
        Some(p)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Schema {
    Primitive(Primitive),
    Enum {
        /// `integer` or `string`.
        value_schema: Primitive,
        values: Vec<EnumValue>,
    },
    Object {
        fields: Vec<Field>,
    },
    Map {
        key_name: String,
        value_name: String,
        value: Box<Schema>,
    },
    Array {
        element: Box<Schema>,
    },
    /// A schema declared elsewhere (an interface's `schemas`), by id; resolution replaces it.
    Ref(Dtmi),
}

#[derive(Debug, Clone, PartialEq)]
pub struct EnumValue {
    pub name: String,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: String,
    pub schema: Schema,
}
