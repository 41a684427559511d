//! The figures, as Markdown on stdout (ready to paste into BENCHMARKS.md).

use std::time::Duration;

pub struct Table {
    title: String,
    notes: Vec<String>,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: impl Into<String>, headers: &[&str]) -> Table {
        Table {
            title: title.into(),
            notes: Vec::new(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// A row that failed: the first cell, then the error across the others.
    pub fn failed(&mut self, first: &str, err: &anyhow::Error) {
        let mut cells = vec![first.to_string(), format!("ERROR: {err:#}")];
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    pub fn print(&self) {
        println!("{}", self.render());
    }

    fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let padded: Vec<String> = (0..columns)
                .map(|i| {
                    let cell = cells.get(i).map(String::as_str).unwrap_or("");
                    // Text left, figures right.
                    if i == 0 {
                        format!("{cell:<width$}", width = widths[i])
                    } else {
                        format!("{cell:>width$}", width = widths[i])
                    }
                })
                .collect();
            format!("| {} |", padded.join(" | "))
        };
        let mut out = format!("## {}\n\n", self.title);
        for note in &self.notes {
            out.push_str(note);
            out.push('\n');
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
        out.push_str(&line(&self.headers));
        out.push('\n');
        let rule: Vec<String> = widths
            .iter()
            .enumerate()
            .map(|(i, w)| {
                // As wide as the padded cell, with the alignment marker.
                if i == 0 {
                    format!(":{}", "-".repeat(w + 1))
                } else {
                    format!("{}:", "-".repeat(w + 1))
                }
            })
            .collect();
        out.push_str(&format!("|{}|\n", rule.join("|")));
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }
}

/// A whole number with thousands separators: `123,456`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate per second, rounded: `12,345`.
pub fn rate(per_sec: f64) -> String {
    if per_sec.is_finite() && per_sec >= 0.0 {
        count(per_sec.round() as u64)
    } else {
        "-".to_string()
    }
}

pub fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

pub fn millis(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.1}")
    }
}

pub fn micros(us: f64) -> String {
    if us < 1.0 {
        format!("{us:.3}")
    } else if us < 100.0 {
        format!("{us:.2}")
    } else {
        format!("{us:.0}")
    }
}

pub fn ratio(x: f64) -> String {
    if !x.is_finite() {
        "-".to_string()
    } else if x < 10.0 {
        format!("{x:.2}x")
    } else {
        format!("{x:.0}x")
    }
}

/// The value at quantile `q` (0..=1) of sorted values (nearest rank).
pub fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_have_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&values, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&values, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&values, 1.0), Some(Duration::from_millis(100)));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
