//! `sluice status`: version, uptime, totals and current rates of a running broker.

use clap::Args;

use super::common::{Connection, Output, cell, client, print_json};
use crate::cli::client::Failure;
use crate::cli::table::Table;

#[derive(Debug, Args)]
pub struct Status {
    #[command(flatten)]
    pub(super) connection: Connection,
}

pub(super) fn status(connection: &Connection) -> Result<(), Failure> {
    let overview = client(connection).get("/api/overview")?;
    if connection.output == Output::Json {
        print_json(&overview);
        return Ok(());
    }
    let totals = &overview["totals"];
    let rates = &overview["rates"];
    let mut table = Table::new(&["field", "value"]);
    let rows = [
        ("version", cell(&overview["version"])),
        ("node", cell(&overview["node_id"])),
        ("cluster", cell(&overview["cluster_id"])),
        (
            "uptime",
            format!("{}s", overview["uptime_ms"].as_u64().unwrap_or(0) / 1000),
        ),
        ("topics", cell(&totals["topics"])),
        ("partitions", cell(&totals["partitions"])),
        ("records", cell(&totals["records"])),
        ("log bytes", cell(&totals["log_bytes"])),
        ("consumer groups", cell(&totals["consumer_groups"])),
        ("queues", cell(&totals["queues"])),
        ("messages ready", cell(&totals["messages_ready"])),
        ("messages unacked", cell(&totals["messages_unacknowledged"])),
        ("connections", cell(&totals["connections"])),
        ("channels", cell(&totals["channels"])),
        (
            "records in/s",
            format!("{:.0}", rates["records_in_per_s"].as_f64().unwrap_or(0.0)),
        ),
        (
            "records out/s",
            format!("{:.0}", rates["records_out_per_s"].as_f64().unwrap_or(0.0)),
        ),
        (
            "messages published/s",
            format!(
                "{:.0}",
                rates["messages_published_per_s"].as_f64().unwrap_or(0.0)
            ),
        ),
        (
            "messages delivered/s",
            format!(
                "{:.0}",
                rates["messages_delivered_per_s"].as_f64().unwrap_or(0.0)
            ),
        ),
        (
            "alarms",
            match totals["alarms"].as_array() {
                Some(list) if !list.is_empty() => {
                    list.iter().map(cell).collect::<Vec<_>>().join(", ")
                }
                _ => "none".to_owned(),
            },
        ),
    ];
    for (field, value) in rows {
        table.row(vec![field.to_owned(), value]);
    }
    for (protocol, address) in overview["listeners"].as_object().into_iter().flatten() {
        table.row(vec![format!("{protocol} listener"), cell(address)]);
    }
    print!("{}", table.render());
    Ok(())
}
