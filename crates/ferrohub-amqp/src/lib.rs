//! AMQP 1.0 codec: the type system (`value`), frames (`frame`), performatives and SASL frames
//! (`performative`) and message sections (`message`). Pure: no I/O, no async, nothing about
//! IoT Hub or Event Hubs.
//!
//! Written here rather than taken from a library because the official Python client
//! (pyamqp in azure-eventhub <= 5.15.1) reads performative fields by position: every
//! performative this crate encodes carries all of its fields, trailing nulls and defaults
//! included (see ARCHITECTURE.md, "AMQP").

pub mod frame;
pub mod message;
pub mod performative;
pub mod value;

pub use frame::{Frame, FrameError, FrameKind};
pub use message::Message;
pub use performative::{Performative, SaslFrame};
pub use value::{DecodeError, Value};
