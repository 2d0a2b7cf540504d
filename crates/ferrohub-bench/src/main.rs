//! `ferrohub-bench`: command-line entry point; parses the subcommand and runs its scenario.

mod device;
mod hub;
mod procfs;
mod registry;
mod scenario;
mod service;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Load generator for Ferrohub (and anything else speaking the IoT Hub device protocol over
/// MQTT 3.1.1 + TLS). Simulated devices are registered through the service REST API first.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Open N device connections, measure connect rate, server CPU per connect and server
    /// memory per idle connection, then disconnect them all.
    Connect(scenario::connect::ConnectArgs),
    /// Keep N connections publishing QoS 1 telemetry with K PUBLISHes in flight each; measure
    /// acknowledged messages per second, PUBACK latency and server CPU per message.
    Telemetry(scenario::telemetry::TelemetryArgs),
    /// Send cloud-to-device messages through the service REST API at a fixed rate, round-robin
    /// over N connected devices that PUBACK at once; measure REST-send-to-device latency, REST
    /// send latency, achieved sends/s and server CPU per message.
    C2d(scenario::c2d::C2dArgs),
    /// Call a direct method through the service REST API at a fixed rate, round-robin over N
    /// connected devices that answer at once; measure the round trip and server CPU per call.
    Methods(scenario::methods::MethodsArgs),
    /// Have N devices publish reported-property patches at a fixed total rate; measure the time
    /// from PUBLISH to the hub's 204 (sent once the patch is durable) and server CPU per patch.
    TwinReported(scenario::twin::TwinArgs),
    /// Fill the telemetry log through MQTT (1,000,000 events by default), then read it all from
    /// the start over AMQP with one Event Hubs receiver per partition; measure events read per
    /// second and server CPU per event, checking every sequence number.
    EventhubRead(scenario::eventhub::read::ReadArgs),
    /// Have N devices publish QoS 1 telemetry at a fixed total rate while one Event Hubs
    /// receiver per partition reads at @latest over AMQP; measure the latency from the device's
    /// PUBLISH to the event's arrival and server CPU per event.
    EventhubLive(scenario::eventhub::live::LiveArgs),
    /// Time POST /devices/query on a large registry (`--populate N` first fills a stopped hub's
    /// store with N devices with tags and reported properties).
    Query(scenario::query::QueryArgs),
    /// Drive every kind of durable write (QoS 1 telemetry, C2D sends, reported patches,
    /// registry creates) until killed, appending each acknowledged write to an ack log the
    /// moment its acknowledgement arrives (scripts/crash-loop.sh).
    CrashWriter(scenario::crash::WriterArgs),
    /// Check that every write in crash-writer ack logs is still there after the hub restarted;
    /// prints a `CHECK {json}` line, fails when anything acknowledged is missing.
    CrashCheck(scenario::crash::CheckArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` gives the whole context chain on one line; returning the error from main
            // would also dump a backtrace whenever RUST_BACKTRACE is set, which helps nobody
            // running a benchmark.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.scenario {
            Scenario::Connect(args) => scenario::connect::run(args).await,
            Scenario::Telemetry(args) => scenario::telemetry::run(args).await,
            Scenario::C2d(args) => scenario::c2d::run(args).await,
            Scenario::Methods(args) => scenario::methods::run(args).await,
            Scenario::TwinReported(args) => scenario::twin::run(args).await,
            Scenario::EventhubRead(args) => scenario::eventhub::read::run(args).await,
            Scenario::EventhubLive(args) => scenario::eventhub::live::run(args).await,
            Scenario::Query(args) => scenario::query::run(args).await,
            Scenario::CrashWriter(args) => scenario::crash::run_writer(args).await,
            Scenario::CrashCheck(args) => scenario::crash::run_check(args).await,
        }
    })
}
