//! `sluice-bench`: the load generator and benchmark suite for Sluice and the brokers it is
//! compared with.
//!
//! It owns the client side of every measurement: Kafka producers and consumers through
//! librdkafka, and consumers through a lean client of its own ([`kafka`], [`kafka_raw`]), AMQP
//! 0-9-1 publishers and consumers through lapin or a lean client of its own ([`amqp`],
//! [`amqp_raw`]), the in-process storage engine benchmarks ([`storage`]), the machine's own
//! limits measured with fio and iperf3 ([`limits`]), and the suite that runs all of them against
//! Sluice and RabbitMQ in one go and puts the figures side by side ([`suite`]).
//!
//! It must never be linked into the broker: it pulls in client libraries the broker has no
//! business carrying. It never asserts a speed; it measures and reports, and the reader judges.
//!
//! Invariants of every measurement:
//! - A message's latency is taken from a send time carried in its own payload (see
//!   [`payload`]), read against the same monotonic clock in the same process.
//! - Rates are computed over the time the work actually took: sending from the first send to
//!   the last broker acknowledgement, receiving from the first message received to the last.
//! - Everything held in memory while a run goes on has a bound: error samples, timeline
//!   samples, in-flight confirms, client queues.

pub mod amqp;
pub mod amqp_raw;
pub mod chart;
pub mod definitions;
pub mod error;
pub mod kafka;
pub mod kafka_raw;
pub mod limits;
pub mod load;
pub mod machine;
pub mod meter;
pub mod net;
pub mod payload;
pub mod report;
pub mod sluice;
pub mod storage;
pub mod suite;
pub mod table;

pub use error::BenchError;
