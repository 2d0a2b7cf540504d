//! IoT Hub semantics.
