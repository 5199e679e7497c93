//! The suite behind `bench/compare`: the same workloads against Sluice and RabbitMQ in one
//! run, the storage engine on its own, and the machine's limits, gathered into one table of
//! figures and ratios.
//!
//! It owns the list of workloads and their sizes in each mode (full, quick, smoke), the order
//! they run in, and the results folder. It starts the Sluice broker itself when given a
//! binary (and always stops it); RabbitMQ is started by the script and only given here as a
//! URI.
//!
//! Rules it keeps:
//! - A workload that cannot run (no Sluice, a listener the broker does not have yet) is
//!   reported as skipped with the reason; one that fails is reported as failed with the
//!   reason. Neither stops the suite.
//! - Each AMQP workload runs against Sluice and then RabbitMQ back to back, so both see the
//!   machine in the same state; ratios are only taken between figures of the same run.
//! - Nothing here asserts a speed.
//!
//! Laid out by concern: `workloads` lists what runs in each mode, `runner` runs it and
//! records the results, `report` holds the results and the comparison rows and targets
//! built from them, and `markdown` writes the summary and its charts.

mod markdown;
mod report;
mod runner;
mod workloads;

pub use markdown::summary_markdown;
pub use report::{
    AlwaysRound, NeverPair, Outcome, SluiceInfo, SuiteReport, TargetCheck, WorkloadResult, rows,
    storage_targets,
};
pub use runner::{SuiteOptions, run};
pub use workloads::{AmqpWorkload, KafkaWorkload, Mode};
