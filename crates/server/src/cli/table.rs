//! Plain-text tables for people: columns padded to their widest cell, numbers right-aligned.

pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    numeric: Vec<bool>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
            numeric: vec![true; headers.len()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        for (index, cell) in cells.iter().enumerate() {
            if index < self.numeric.len()
                && !cell.is_empty()
                && cell != "-"
                && cell.parse::<f64>().is_err()
            {
                self.numeric[index] = false;
            }
        }
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (index, cell) in row.iter().enumerate() {
                if index < widths.len() {
                    widths[index] = widths[index].max(cell.chars().count());
                }
            }
        }
        let mut out = String::new();
        let line = |cells: &[String], out: &mut String| {
            let mut parts = Vec::with_capacity(cells.len());
            for (index, cell) in cells.iter().enumerate() {
                let width = widths.get(index).copied().unwrap_or(0);
                let pad = width.saturating_sub(cell.chars().count());
                let last = index + 1 == cells.len();
                if self.numeric.get(index).copied().unwrap_or(false) {
                    parts.push(format!("{}{cell}", " ".repeat(pad)));
                } else if last {
                    parts.push(cell.clone());
                } else {
                    parts.push(format!("{cell}{}", " ".repeat(pad)));
                }
            }
            out.push_str(parts.join("  ").trim_end());
            out.push('\n');
        };
        line(&self.headers, &mut out);
        for row in &self.rows {
            line(row, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Table;

    #[test]
    fn pads_text_left_and_numbers_right() {
        let mut table = Table::new(&["name", "records"]);
        table.row(vec!["orders".into(), "5".into()]);
        table.row(vec!["a".into(), "12345".into()]);
        assert_eq!(
            table.render(),
            "NAME    RECORDS\norders        5\na         12345\n"
        );
    }
}
