//! Output formats and the helpers every command renders with: kubectl-style tables (no borders,
//! two spaces between columns, fitted to a width), colour, human-readable numbers and times,
//! JSON and YAML, and `--watch`.
//!
//! Rendering is pure: every command turns API values into a `String` with a [`Render`], so the
//! layout is tested on fixed values (tests/snapshots.rs) without a daemon or a terminal.

use std::{
    io::{IsTerminal, Write},
    time::Duration,
};

use anyhow::Result;
use jiff::{Timestamp, tz::Offset};
use serde::Serialize;

/// `-o`: how a listing is printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns that fit the terminal (80 columns for typical names).
    #[default]
    Table,
    /// More columns, exact numbers, nothing truncated.
    Wide,
    /// The API's own JSON (camelCase), as `curl` on the socket would show it.
    Json,
    /// The same objects as YAML.
    Yaml,
}

impl Format {
    pub fn is_structured(self) -> bool {
        matches!(self, Format::Json | Format::Yaml)
    }
}

/// `-o` for every listing.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// `--watch` for the listings that change while one looks.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct WatchArgs {
    /// Re-render every 2 seconds until interrupted (Ctrl-C).
    #[arg(short = 'w', long)]
    pub watch: bool,
}

/// `--color`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colour when standard output is a terminal and NO_COLOR is not set.
    #[default]
    Auto,
    Always,
    Never,
}

/// Where the output goes: whether to colour it and the width tables must fit in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Render {
    pub color: bool,
    /// Tables shrink their flexible columns (names) to fit; `None`: no limit.
    pub width: Option<usize>,
}

impl Render {
    /// No colour, 80 columns: what tests compare against.
    pub fn plain(width: usize) -> Render {
        Render {
            color: false,
            width: Some(width),
        }
    }

    /// From the flag, the environment and standard output: colour only on a terminal and
    /// without NO_COLOR (https://no-color.org); tables fit the terminal, or `$COLUMNS`, or have
    /// no limit when piped.
    pub fn detect(choice: ColorChoice) -> Render {
        let tty = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        let color = match choice {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => tty && !no_color && !dumb,
        };
        let columns = std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.trim().parse::<usize>().ok())
            .filter(|c| *c > 0);
        let width = if tty {
            terminal_width().or(columns).or(Some(80))
        } else {
            columns
        };
        Render { color, width }
    }

    /// `wide` output is never truncated: it has no width limit.
    pub fn for_format(&self, format: Format) -> Render {
        Render {
            color: self.color,
            width: if format == Format::Wide {
                None
            } else {
                self.width
            },
        }
    }

    pub fn paint(&self, text: &str, paint: Paint) -> String {
        paint.apply(text, self.color)
    }
}

fn terminal_width() -> Option<usize> {
    // SAFETY: TIOCGWINSZ fills the winsize we own.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some(ws.ws_col as usize)
}

/// A colour or weight for a piece of text; nothing when colour is off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Paint {
    #[default]
    None,
    Bold,
    Dim,
    Green,
    Yellow,
    Red,
    Cyan,
}

impl Paint {
    fn code(self) -> Option<&'static str> {
        match self {
            Paint::None => None,
            Paint::Bold => Some("1"),
            Paint::Dim => Some("2"),
            Paint::Green => Some("32"),
            Paint::Yellow => Some("33"),
            Paint::Red => Some("31"),
            Paint::Cyan => Some("36"),
        }
    }

    pub fn apply(self, text: &str, color: bool) -> String {
        match self.code() {
            Some(code) if color && !text.is_empty() => format!("\x1b[{code}m{text}\x1b[0m"),
            _ => text.to_owned(),
        }
    }

    /// Red when `n` is not zero: drops, errors.
    pub fn alarm(n: u64) -> Paint {
        if n > 0 { Paint::Red } else { Paint::None }
    }
}

/// One table cell: its text and how to paint it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cell {
    pub text: String,
    pub paint: Paint,
}

impl Cell {
    pub fn new(text: impl Into<String>, paint: Paint) -> Cell {
        Cell {
            text: text.into(),
            paint,
        }
    }
}

impl From<String> for Cell {
    fn from(text: String) -> Cell {
        Cell {
            text,
            paint: Paint::None,
        }
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Cell {
        Cell::from(text.to_owned())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

#[derive(Clone, Debug)]
struct Column {
    header: String,
    align: Align,
    /// Names and other free text: truncated with `…` when the table is too wide.
    flex: bool,
}

/// Spaces between two columns.
pub const GAP: usize = 2;
/// A flexible column is never shrunk below this (or its header).
const MIN_FLEX: usize = 6;

/// A kubectl-style table: a header line and aligned rows, no borders.
#[derive(Clone, Debug, Default)]
pub struct Table {
    columns: Vec<Column>,
    rows: Vec<Vec<Cell>>,
    indent: usize,
}

impl Table {
    pub fn new() -> Table {
        Table::default()
    }

    /// Adds a left-aligned column.
    pub fn col(mut self, header: &str) -> Table {
        self.columns.push(Column {
            header: header.to_owned(),
            align: Align::Left,
            flex: false,
        });
        self
    }

    /// The last column added is right-aligned (numbers).
    pub fn right(mut self) -> Table {
        if let Some(c) = self.columns.last_mut() {
            c.align = Align::Right;
        }
        self
    }

    /// The last column added may be truncated to fit the width.
    pub fn flex(mut self) -> Table {
        if let Some(c) = self.columns.last_mut() {
            c.flex = true;
        }
        self
    }

    /// Every line starts with `n` spaces (a table nested under a heading).
    pub fn indent(mut self, n: usize) -> Table {
        self.indent = n;
        self
    }

    pub fn row(&mut self, cells: Vec<Cell>) {
        debug_assert_eq!(cells.len(), self.columns.len(), "one cell per column");
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The column widths: the widest cell (or header), then flexible columns shrunk, widest
    /// first, until the table fits `width` or none can shrink further.
    fn widths(&self, width: Option<usize>) -> Vec<usize> {
        let mut widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                self.rows
                    .iter()
                    .map(|r| text_width(&r[i].text))
                    .chain([text_width(&c.header)])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let Some(limit) = width else {
            return widths;
        };
        let total =
            |w: &[usize]| self.indent + w.iter().sum::<usize>() + GAP * (w.len().max(1) - 1);
        while total(&widths) > limit {
            let shrinkable = self
                .columns
                .iter()
                .enumerate()
                .filter(|(i, c)| c.flex && widths[*i] > MIN_FLEX.max(text_width(&c.header)))
                .max_by_key(|(i, _)| widths[*i])
                .map(|(i, _)| i);
            match shrinkable {
                Some(i) => widths[i] -= 1,
                None => break,
            }
        }
        widths
    }

    pub fn render(&self, r: &Render) -> String {
        let widths = self.widths(r.width);
        let mut out = String::new();
        let headers: Vec<Cell> = self
            .columns
            .iter()
            .map(|c| Cell::new(c.header.clone(), Paint::Bold))
            .collect();
        for cells in std::iter::once(&headers).chain(&self.rows) {
            let mut line = " ".repeat(self.indent);
            for (i, (cell, col)) in cells.iter().zip(&self.columns).enumerate() {
                let last = i + 1 == self.columns.len();
                let text = truncate(&cell.text, widths[i]);
                let pad = widths[i] - text_width(&text);
                let painted = r.paint(&text, cell.paint);
                match col.align {
                    Align::Left if last => line.push_str(&painted),
                    Align::Left => {
                        line.push_str(&painted);
                        line.push_str(&" ".repeat(pad));
                    }
                    Align::Right => {
                        line.push_str(&" ".repeat(pad));
                        line.push_str(&painted);
                    }
                }
                if !last {
                    line.push_str(&" ".repeat(GAP));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Columns a string takes on a terminal (one per character: names here are ASCII in practice).
pub fn text_width(s: &str) -> usize {
    s.chars().count()
}

/// `s` cut to `width` columns, its last one `…` when cut.
pub fn truncate(s: &str, width: usize) -> String {
    if text_width(s) <= width {
        return s.to_owned();
    }
    if width == 0 {
        return String::new();
    }
    let mut t: String = s.chars().take(width - 1).collect();
    t.push('…');
    t
}

/// Label/value lines with the values aligned, as `kubectl describe` prints them.
#[derive(Clone, Debug, Default)]
pub struct Fields {
    rows: Vec<(String, Cell)>,
    indent: usize,
}

impl Fields {
    pub fn new() -> Fields {
        Fields::default()
    }

    pub fn indent(mut self, n: usize) -> Fields {
        self.indent = n;
        self
    }

    pub fn add(&mut self, label: &str, value: impl Into<Cell>) {
        self.rows.push((label.to_owned(), value.into()));
    }

    /// Values longer than the width left are wrapped at spaces, continued under the value.
    pub fn render(&self, r: &Render) -> String {
        let w = self
            .rows
            .iter()
            .map(|(l, _)| text_width(l) + 1)
            .max()
            .unwrap_or(0);
        let value_col = self.indent + w + GAP;
        let room = r.width.map(|w| w.saturating_sub(value_col).max(20));
        let mut out = String::new();
        for (label, value) in &self.rows {
            let label = format!("{label}:");
            for (i, part) in wrap(&value.text, room).iter().enumerate() {
                let line = if i == 0 {
                    format!(
                        "{}{label}{}{}",
                        " ".repeat(self.indent),
                        " ".repeat(w - text_width(&label) + GAP),
                        r.paint(part, value.paint)
                    )
                } else {
                    format!("{}{}", " ".repeat(value_col), r.paint(part, value.paint))
                };
                out.push_str(line.trim_end());
                out.push('\n');
            }
        }
        out
    }
}

/// `text` in lines of at most `width` columns, broken at spaces (a longer word stays whole).
pub fn wrap(text: &str, width: Option<usize>) -> Vec<String> {
    let Some(width) = width else {
        return vec![text.to_owned()];
    };
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && text_width(&line) + 1 + text_width(word) > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    lines.push(line);
    lines
}

/// A section heading (bold on a terminal).
pub fn heading(r: &Render, text: &str) -> String {
    format!("{}\n", r.paint(text, Paint::Bold))
}

/// Pretty JSON with a final newline.
pub fn to_json<T: Serialize + ?Sized>(v: &T) -> Result<String> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(s)
}

pub fn to_yaml<T: Serialize + ?Sized>(v: &T) -> Result<String> {
    Ok(serde_yaml::to_string(v)?)
}

/// JSON or YAML of `v` for a structured format; `None` for table and wide.
pub fn structured<T: Serialize + ?Sized>(format: Format, v: &T) -> Option<Result<String>> {
    match format {
        Format::Json => Some(to_json(v)),
        Format::Yaml => Some(to_yaml(v)),
        Format::Table | Format::Wide => None,
    }
}

/// A count with a metric suffix: 999, 1.2k, 34k, 5.6M.
pub fn count(n: u64) -> String {
    scaled(n, 1000.0, &["", "k", "M", "G", "T", "P"])
}

/// A byte count in binary units: 512B, 1.5KiB, 96KiB, 3.2MiB.
pub fn bytes(n: u64) -> String {
    let mut s = scaled(n, 1024.0, &["", "Ki", "Mi", "Gi", "Ti", "Pi"]);
    s.push('B');
    s
}

fn scaled(n: u64, base: f64, units: &[&str]) -> String {
    let mut v = n as f64;
    let mut i = 0;
    // Scaled while it would print as `base` or more (999.7k is 1.0M).
    while v.round() >= base && i + 1 < units.len() {
        v /= base;
        i += 1;
    }
    if i == 0 {
        format!("{n}")
    } else if v < 9.95 {
        format!("{v:.1}{}", units[i])
    } else {
        format!("{v:.0}{}", units[i])
    }
}

/// `part` of `whole` in percent, one decimal.
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    format!("{:.1}%", part as f64 * 100.0 / whole as f64)
}

/// A duration as kubectl prints ages: 45s, 3m12s, 2h5m, 3d4h.
pub fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

pub fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// "-" for nothing.
pub fn or_dash(s: Option<&str>) -> String {
    match s {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => "-".into(),
    }
}

/// The local time zone's offset from UTC at `unix_secs`, in seconds.
pub fn local_offset_secs(unix_secs: i64) -> i64 {
    #[allow(deprecated)] // musl's time_t is deprecated only to warn of a future 64-bit change
    let t = unix_secs as libc::time_t;
    // SAFETY: localtime_r writes into the tm we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return 0;
    }
    tm.tm_gmtoff
}

/// The fixed offset `offset_secs` from UTC (UTC if it is out of range).
fn offset(offset_secs: i64) -> Offset {
    i32::try_from(offset_secs)
        .ok()
        .and_then(|s| Offset::from_seconds(s).ok())
        .unwrap_or(Offset::UTC)
}

/// `Nov 25 19:30:00.123`, as `hubble observe` prints times, at `offset_secs` from UTC.
pub fn event_time(unix_ms: u64, offset_secs: i64) -> String {
    let t = i64::try_from(unix_ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .unwrap_or(Timestamp::MAX);
    offset(offset_secs)
        .to_datetime(t)
        .strftime("%b %d %H:%M:%S%.3f")
        .to_string()
}

/// `19:30:05`, local time now (the `--watch` header).
fn clock_now() -> String {
    let now = Timestamp::now();
    offset(local_offset_secs(now.as_second()))
        .to_datetime(now)
        .strftime("%H:%M:%S")
        .to_string()
}

/// Seconds between two `--watch` renderings.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Prints `render()` once, or with `watch` every [`WATCH_INTERVAL`] until interrupted: on a
/// terminal the screen is redrawn under a `watch(1)`-style header; otherwise renderings follow
/// one another. The first error ends the command; later ones (a daemon restarting) are shown and
/// retried.
pub fn print_or_watch(
    watch: bool,
    title: &str,
    mut render: impl FnMut() -> Result<String>,
) -> Result<()> {
    let first = render()?;
    if !watch {
        print_flush(&first)?;
        return Ok(());
    }
    let tty = std::io::stdout().is_terminal();
    let mut body = first;
    loop {
        if tty {
            let header = format!(
                "Every {}s: {title}    {}  (Ctrl-C to quit)\n\n",
                WATCH_INTERVAL.as_secs(),
                clock_now()
            );
            print_flush(&format!("\x1b[H\x1b[2J{header}{body}"))?;
        } else {
            print_flush(&format!("{body}\n"))?;
        }
        std::thread::sleep(WATCH_INTERVAL);
        body = render().unwrap_or_else(|e| format!("error: {}\n", crate::describe_error(&e)));
    }
}

/// Writes to standard output and flushes (output read by another program line by line).
pub fn print_flush(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_short() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1.0k");
        assert_eq!(count(1234), "1.2k");
        assert_eq!(count(34_567), "35k");
        assert_eq!(count(5_600_000), "5.6M");
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(98_304), "96KiB");
        assert_eq!(bytes(10_188), "9.9KiB");
        assert_eq!(bytes(10_239), "10KiB");
        assert_eq!(count(999_700), "1.0M");
        assert_eq!(bytes(10_240), "10KiB");
        assert_eq!(percent(1, 3), "33.3%");
        assert_eq!(percent(0, 0), "-");
    }

    #[test]
    fn ages_as_kubectl() {
        assert_eq!(age(0.4), "0s");
        assert_eq!(age(59.9), "59s");
        assert_eq!(age(192.0), "3m12s");
        assert_eq!(age(7500.0), "2h5m");
        assert_eq!(age(273_600.0), "3d4h");
    }

    #[test]
    fn event_times() {
        assert_eq!(event_time(1_764_099_000_123, 0), "Nov 25 19:30:00.123");
        assert_eq!(event_time(0, 0), "Jan 01 00:00:00.000");
        assert_eq!(event_time(1_764_099_000_123, 3600), "Nov 25 20:30:00.123");
        assert_eq!(event_time(1_709_164_800_000, 0), "Feb 29 00:00:00.000");
    }

    #[test]
    fn tables_align_and_shrink_names_to_fit() {
        let mut t = Table::new().col("NAME").flex().col("N").right().col("NOTE");
        t.row(vec![
            "a-very-long-name-indeed".into(),
            "7".into(),
            "x".into(),
        ]);
        t.row(vec!["b".into(), "1234".into(), "".into()]);
        assert_eq!(
            t.render(&Render::plain(80)),
            "NAME                        N  NOTE\n\
             a-very-long-name-indeed     7  x\n\
             b                        1234\n"
        );
        let narrow = t.render(&Render::plain(20));
        assert!(narrow.lines().all(|l| text_width(l) <= 20), "{narrow}");
        assert!(narrow.contains("a-very-…     7"), "{narrow}");
    }

    #[test]
    fn colour_only_when_asked() {
        let r = Render {
            color: true,
            width: None,
        };
        let mut t = Table::new().col("A").col("B");
        t.row(vec![Cell::new("ok", Paint::Green), "x".into()]);
        let s = t.render(&r);
        assert!(
            s.starts_with("\x1b[1mA\x1b[0m   \x1b[1mB\x1b[0m\n"),
            "{s:?}"
        );
        assert!(s.contains("\x1b[32mok\x1b[0m  x"), "{s:?}");
        assert!(!t.render(&Render::plain(80)).contains('\x1b'));
    }
}
