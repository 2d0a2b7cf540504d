//! DTDL (Digital Twins Definition Language) v2 and v3 interfaces as IoT Plug and Play uses
//! them, as pure code: model ids (`dtmi`), the parser from JSON with errors that name the file,
//! the JSON path and what is wrong (`parse`), the model types (`model`), resolution of a model
//! id to its interface with `extends` and components (`resolve`), and checks of a JSON value
//! against a schema (`check`) and the IoT Plug and Play conventions (`conformance`). No I/O: the hub's model
//! repository stores the documents and hands them in.

pub mod check;
pub mod conformance;
pub mod dtmi;
pub mod model;
pub mod parse;
pub mod resolve;

pub use dtmi::{Dtmi, DtmiError};
pub use model::{
    Command, CommandPayload, Component, Content, DtdlVersion, EnumValue, Field, Interface,
    Primitive, Property, Schema, Telemetry,
};
pub use parse::{parse_document, DtdlError};
pub use resolve::{Model, ModelSet, ResolveError};
