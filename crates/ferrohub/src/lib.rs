//! Ferrohub: a self-hosted server that speaks the Azure IoT Hub device protocol.
//!
//! Parts: [`mqtt`] (the MQTT front end over the broker), [`endpoints`] (the senders of webhook
//! and NATS routing endpoints), [`api`]
//! (service REST API and the WebSocket endpoint), [`server`] (listeners and start-up), [`https_conn`]
//! (time limits of HTTPS connections), [`tls`],
//! [`config`], and [`cli`] (the command line, a client of the REST API).

pub mod amqp;
pub mod api;
pub mod cli;
pub mod config;
pub mod endpoints;
pub mod https_conn;
pub mod metrics;
pub mod mqtt;
pub mod server;
pub mod telemetry_storage;
pub mod tls;
pub mod ws;
