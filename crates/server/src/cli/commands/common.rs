//! What every subcommand shares: the connection flags, the output format, `key=value`
//! parsing, typed arguments and the JSON and table printers.

use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use crate::cli::client::Client;
use crate::cli::table::Table;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// How to reach the broker's admin API.
#[derive(Debug, Args)]
pub struct Connection {
    /// The admin API's address.
    #[arg(
        long,
        global = true,
        env = "SLUICE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub(super) url: String,
    #[arg(long, global = true, env = "SLUICE_USER", default_value = "guest")]
    pub(super) user: String,
    #[arg(
        long,
        global = true,
        env = "SLUICE_PASSWORD",
        default_value = "guest",
        hide_env_values = true
    )]
    pub(super) password: String,
    /// `table` for people, `json` for scripts.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    pub(super) output: Output,
}

pub(super) fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {text:?}"))
}

pub(super) fn client(connection: &Connection) -> Client {
    Client::new(&connection.url, &connection.user, &connection.password)
}

pub(super) fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// Prints a listing: as JSON for scripts, else one table row per element made by `row`.
pub(super) fn print_list(
    list: &Value,
    json_out: bool,
    headers: &[&str],
    row: impl Fn(&Value) -> Vec<String>,
) {
    if json_out {
        print_json(list);
        return;
    }
    let mut table = Table::new(headers);
    for item in list.as_array().into_iter().flatten() {
        table.row(row(item));
    }
    print!("{}", table.render());
}

pub(super) fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A typed argument value: integers, floats and booleans as such, anything else as text.
fn typed(value: &str) -> Value {
    if let Ok(i) = value.parse::<i64>() {
        return json!(i);
    }
    if let Ok(f) = value.parse::<f64>() {
        return json!(f);
    }
    match value {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::String(value.to_owned()),
    }
}

pub(super) fn arguments(pairs: &[(String, String)]) -> Value {
    Value::Object(pairs.iter().map(|(k, v)| (k.clone(), typed(v))).collect())
}
