//! Headers matching: a binding's arguments name the headers a message must carry.
//!
//! `x-match` chooses the rule: `all` (the default) needs every named header present with an
//! equal value, `any` needs at least one; `all-with-x` and `any-with-x` also compare arguments
//! whose names start with `x-`, which the plain rules skip. An argument whose value is void
//! matches any value of that header. Values compare by meaning, so an integer matches an equal
//! integer of another width, as RabbitMQ does.

use crate::message::value::{FieldTable, FieldValue, lookup};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    All,
    Any,
}

/// One compiled headers binding.
#[derive(Debug, Clone)]
pub struct HeadersMatch {
    rule: Rule,
    conditions: Vec<(String, FieldValue)>,
}

impl HeadersMatch {
    pub fn new(arguments: &FieldTable) -> Self {
        let mode = lookup(arguments, "x-match").and_then(FieldValue::as_str);
        let (rule, with_x) = match mode {
            Some("any") => (Rule::Any, false),
            Some("any-with-x") => (Rule::Any, true),
            Some("all-with-x") => (Rule::All, true),
            _ => (Rule::All, false),
        };
        let conditions = arguments
            .iter()
            .filter(|(key, _)| key != "x-match" && (with_x || !key.starts_with("x-")))
            .cloned()
            .collect();
        Self { rule, conditions }
    }

    pub fn matches(&self, headers: Option<&FieldTable>) -> bool {
        let empty = FieldTable::new();
        let headers = headers.unwrap_or(&empty);
        let mut hits = self.conditions.iter().map(|(key, expected)| {
            lookup(headers, key)
                .is_some_and(|found| *expected == FieldValue::Void || expected.same_value(found))
        });
        match self.rule {
            Rule::All => hits.all(|hit| hit),
            Rule::Any => hits.any(|hit| hit),
        }
    }
}

/// Checks a headers binding's `x-match` argument. RabbitMQ refuses unknown modes.
pub fn validate(arguments: &FieldTable) -> Result<(), String> {
    match lookup(arguments, "x-match") {
        None => Ok(()),
        Some(value) => match value.as_str() {
            Some("all" | "any" | "all-with-x" | "any-with-x") => Ok(()),
            _ => Err(format!(
                "Invalid x-match field value {}; expected all, any, all-with-x, or any-with-x",
                value.display()
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, FieldValue)]) -> FieldTable {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn all_and_any() {
        let all = HeadersMatch::new(&table(&[
            ("format", FieldValue::string("pdf")),
            ("type", FieldValue::string("report")),
        ]));
        let any = HeadersMatch::new(&table(&[
            ("x-match", FieldValue::string("any")),
            ("format", FieldValue::string("pdf")),
            ("type", FieldValue::string("report")),
        ]));
        let both = table(&[
            ("format", FieldValue::string("pdf")),
            ("type", FieldValue::string("report")),
        ]);
        let one = table(&[("format", FieldValue::string("pdf"))]);
        assert!(all.matches(Some(&both)));
        assert!(!all.matches(Some(&one)));
        assert!(any.matches(Some(&one)));
        assert!(!any.matches(None));
    }

    #[test]
    fn void_matches_presence_and_integers_match_across_widths() {
        let binding = HeadersMatch::new(&table(&[
            ("present", FieldValue::Void),
            ("n", FieldValue::I16(5)),
        ]));
        let headers = table(&[
            ("present", FieldValue::string("anything")),
            ("n", FieldValue::I64(5)),
        ]);
        assert!(binding.matches(Some(&headers)));
    }

    #[test]
    fn x_arguments_are_ignored_unless_asked_for() {
        let plain = HeadersMatch::new(&table(&[("x-tag", FieldValue::string("a"))]));
        assert!(plain.matches(None), "no conditions left: all of none holds");
        let with_x = HeadersMatch::new(&table(&[
            ("x-match", FieldValue::string("all-with-x")),
            ("x-tag", FieldValue::string("a")),
        ]));
        assert!(!with_x.matches(None));
        assert!(validate(&table(&[("x-match", FieldValue::string("some"))])).is_err());
    }
}
