//! Ferrohub: a self-hosted server that speaks the Azure IoT Hub device protocol.
//!
//! Parts: [`mqtt`] (the MQTT front end over the broker), [`endpoints`] (the senders of webhook
//! and NATS routing endpoints), [`api`]
//! (service REST API and the WebSocket endpoint), [`explorer`] (the web explorer's back end), [`server`] (listeners and start-up), [`https_conn`]
//! (time limits of HTTPS connections), [`tls`], [`tls_stream`] (the MQTT listener's TLS stream),
//! [`config`], and [`cli`] (the command line, a client of the REST API).

pub mod amqp;
pub mod api;
pub mod cli;
pub mod config;
pub mod endpoints;
pub mod explorer;
pub mod https_conn;
pub mod metrics;
pub mod mqtt;
pub mod server;
pub mod telemetry_storage;
pub mod tls;
pub mod tls_stream;
pub mod ws;
