//! The comparison table: one row per figure, with Sluice's value beside RabbitMQ's and beside
//! the machine's limit, and the ratios between them.
//!
//! Ratios are always Sluice divided by the other, whatever the unit, so for rates above 1 is
//! better for Sluice and for latencies and memory below 1 is; each row says which.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub figure: String,
    pub unit: String,
    pub sluice: Cell,
    pub rabbitmq: Cell,
    pub limit: Option<f64>,
    /// What the limit is, for example `iperf3 loopback`.
    pub limit_name: Option<String>,
    pub higher_is_better: bool,
}

/// A measured value, or why there is none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Cell {
    Value(f64),
    /// Not measured, with a short reason (`skipped`, `failed`, `n/a`).
    Missing(String),
}

impl Cell {
    pub fn value(&self) -> Option<f64> {
        match self {
            Self::Value(value) => Some(*value),
            Self::Missing(_) => None,
        }
    }

    pub fn na() -> Self {
        Self::Missing("n/a".into())
    }
}

impl Row {
    pub fn sluice_over_rabbitmq(&self) -> Option<f64> {
        ratio(self.sluice.value(), self.rabbitmq.value())
    }

    pub fn sluice_over_limit(&self) -> Option<f64> {
        ratio(self.sluice.value(), self.limit)
    }
}

fn ratio(top: Option<f64>, bottom: Option<f64>) -> Option<f64> {
    match (top, bottom) {
        (Some(top), Some(bottom)) if bottom > 0.0 => Some(top / bottom),
        _ => None,
    }
}

/// A number with a sensible count of digits for a table.
pub fn format_number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1000.0 {
        let whole = format!("{value:.0}");
        group_thousands(&whole)
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

fn group_thousands(digits: &str) -> String {
    let (sign, digits) = digits.strip_prefix('-').map_or(("", digits), |d| ("-", d));
    let mut out = String::new();
    for (index, ch) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    format!("{sign}{out}")
}

fn format_cell(cell: &Cell) -> String {
    match cell {
        Cell::Value(value) => format_number(*value),
        Cell::Missing(reason) => reason.clone(),
    }
}

fn format_ratio(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "—".into(), |r| format!("{r:.2}×"))
}

/// The rows as a Markdown table.
pub fn to_markdown(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| figure | unit | Sluice | RabbitMQ | Sluice / RabbitMQ | limit | Sluice / limit |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in rows {
        let better = if row.higher_is_better { "↑" } else { "↓" };
        let limit = match (row.limit, &row.limit_name) {
            (Some(limit), Some(name)) => format!("{} ({name})", format_number(limit)),
            (Some(limit), None) => format_number(limit),
            _ => "—".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} {better} | {} | {} | {} | {limit} | {} |",
            row.figure,
            row.unit,
            format_cell(&row.sluice),
            format_cell(&row.rabbitmq),
            format_ratio(row.sluice_over_rabbitmq()),
            format_ratio(row.sluice_over_limit()),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_sluice_over_the_other() {
        let row = Row {
            figure: "x".into(),
            unit: "msg/s".into(),
            sluice: Cell::Value(300.0),
            rabbitmq: Cell::Value(100.0),
            limit: Some(600.0),
            limit_name: Some("iperf3".into()),
            higher_is_better: true,
        };
        assert_eq!(row.sluice_over_rabbitmq(), Some(3.0));
        assert_eq!(row.sluice_over_limit(), Some(0.5));
        let table = to_markdown(&[row]);
        assert!(
            table.contains("| x | msg/s ↑ | 300 | 100 | 3.00× | 600 (iperf3) | 0.50× |"),
            "{table}"
        );
    }

    #[test]
    fn missing_values_have_no_ratio() {
        let row = Row {
            figure: "y".into(),
            unit: "ms".into(),
            sluice: Cell::Missing("skipped".into()),
            rabbitmq: Cell::Value(2.0),
            limit: None,
            limit_name: None,
            higher_is_better: false,
        };
        assert_eq!(row.sluice_over_rabbitmq(), None);
        assert!(to_markdown(&[row]).contains("| y | ms ↓ | skipped | 2.00 | — | — | — |"));
    }

    #[test]
    fn numbers_are_grouped_and_rounded() {
        assert_eq!(format_number(1_234_567.4), "1,234,567");
        assert_eq!(format_number(123.4), "123");
        assert_eq!(format_number(12.34), "12.3");
        assert_eq!(format_number(1.234), "1.23");
        assert_eq!(format_number(0.1234), "0.123");
        assert_eq!(format_number(-1234.0), "-1,234");
    }
}
