//! A tolerant scan of PromQL and MetricsQL text, in one linear pass.
//!
//! It runs before the PromQL parser and bounds what reaches it: the length, the
//! nesting (an upper bound on the depth of the syntax tree, which the parser and
//! every recursive walk over the tree need stack for), balanced brackets, closed
//! strings, and durations that fit in 292 years. When the parser cannot analyse a
//! query (MetricsQL, functions newer than promql-parser), the same scan says what
//! the query can read (range selectors, subquery ranges, `offset`, `@`) without
//! knowing function names, and gives a normalised text for cache keys. Pure.

use std::sync::Arc;

use crate::units::{MAX_DURATION, Millis};

/// Bounds on a query's text, checked before anything parses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanLimits {
    /// Longest query text, in bytes.
    pub max_length: usize,
    /// Deepest nesting: brackets opened and operators chained, counted as an upper
    /// bound on the syntax tree's depth.
    pub max_depth: usize,
}

impl Default for ScanLimits {
    fn default() -> Self {
        // Real dashboards stay below a few KiB and a nesting of 20; these bounds
        // are far above that and far below what exhausts a thread's stack or
        // makes the parser's quadratic cases slow (about 2 ms at depth 256).
        ScanLimits {
            max_length: 128 * 1024,
            max_depth: 256,
        }
    }
}

/// Why a query text is refused before any backend sees it: no backend could
/// accept it, or it exceeds promguard's documented bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// Longer than `query.max_length`.
    #[error("the query is {length} bytes long, more than the limit of {max} (query.max_length)")]
    TooLong {
        /// The text's length, in bytes.
        length: usize,
        /// `query.max_length`, in bytes.
        max: usize,
    },
    /// Nested deeper than `query.max_depth`: the parser and every walk over the
    /// tree recurse, so each level costs stack.
    #[error(
        "the query nests {depth} levels deep (brackets and chained operators), more than \
         the limit of {max} (query.max_depth)"
    )]
    TooDeep {
        /// The depth where the scan stopped: the first level past `max`.
        depth: usize,
        /// `query.max_depth`.
        max: usize,
    },
    /// A bracket closed by the wrong kind, closing nothing, or never closed; which
    /// one, in words.
    #[error("unbalanced brackets: {0}")]
    Unbalanced(String),
    /// A quote that is never closed; the byte offset where the string starts.
    #[error("unterminated string starting at byte {0}")]
    UnterminatedString(usize),
    /// A duration over 292 years (what Go's `time.Duration` holds; the parser
    /// panics beyond it), as written.
    #[error("duration {0:?} is out of range: durations must be at most 292 years")]
    Duration(String),
}

/// What a scan found: the facts the tolerant analysis needs, and a normalised text.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scanned {
    /// The tokens joined by single spaces, comments dropped: queries that differ
    /// only in whitespace or comments share it, and no two others do.
    pub normalized: String,
    /// Every range selector and subquery range, added up: however they nest, the
    /// query reads no further back than their sum. Ranges written in steps
    /// (MetricsQL's `1i`) are kept apart, since the step is only known per request.
    pub ranges: Reach,
    /// Positive offsets, added up.
    pub offsets_back: Reach,
    /// Negative offsets (reading ahead of the evaluation time), added up.
    pub offsets_ahead: Reach,
    /// The earliest `@ <timestamp>`, in milliseconds.
    pub at_min: Option<Millis>,
    /// The latest `@ <timestamp>`, in milliseconds.
    pub at_max: Option<Millis>,
    /// `@ start()` or `@ end()` appear.
    pub uses_range_bounds: bool,
    /// Anything that can select series: a `{` or a name that is neither a keyword
    /// nor a function call. `1+1` and `time()` select nothing.
    pub selects_series: bool,
    /// The selector with the longest range, as written (`x{a="b"}[30d]`).
    pub furthest: Option<Arc<str>>,
    /// How deep it nests (the bound checked against [`ScanLimits::max_depth`]).
    pub depth: usize,
}

/// A duration found in the text: milliseconds plus a count of steps.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Reach {
    /// Durations written in time units, in milliseconds.
    pub ms: f64,
    /// Durations written in steps (MetricsQL's `5i`), resolved per request by
    /// [`Reach::at_step`].
    pub steps: f64,
}

impl Reach {
    fn add(&mut self, other: Reach) {
        self.ms += other.ms;
        self.steps += other.steps;
    }

    /// In milliseconds, for a query evaluated at `step_ms`, saturating.
    pub fn at_step(&self, step_ms: i64) -> i64 {
        let ms = self.ms + self.steps * step_ms as f64;
        if ms.is_finite() && ms < i64::MAX as f64 {
            ms.max(0.0) as i64
        } else {
            i64::MAX
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    Ident(&'a str),
    /// A number or a duration (`5m`, `1h30m`, `1.5e3`, `0x1f`, `1i`).
    Number(&'a str),
    Str(&'a str),
    Open(u8),
    Close(u8),
    Op(&'a str),
    /// `,`, `:`, `@`, `;` and anything else the scan does not interpret.
    Punct(&'a str),
}

impl Tok<'_> {
    fn text(&self) -> &str {
        match self {
            Tok::Ident(t) | Tok::Number(t) | Tok::Str(t) | Tok::Op(t) | Tok::Punct(t) => t,
            Tok::Open(b'(') => "(",
            Tok::Open(b'[') => "[",
            Tok::Open(_) => "{",
            Tok::Close(b')') => ")",
            Tok::Close(b']') => "]",
            Tok::Close(_) => "}",
        }
    }
}

/// Words that never name series (PromQL and MetricsQL keywords).
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "atan2",
    "with",
    "default",
    "if",
    "ifnot",
    "keep_metric_names",
    "limit",
    "inf",
    "nan",
];

/// Operator words: each may add a level to the syntax tree.
const OPERATOR_WORDS: &[&str] = &[
    "and", "or", "unless", "atan2", "default", "if", "ifnot", "offset",
];

fn keyword(word: &str) -> bool {
    KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(word))
}

/// Scan `text` within `limits`.
///
/// # Errors
///
/// [`ScanError`] for text no backend could accept (unbalanced brackets, an
/// unterminated string) or beyond the limits (length, nesting, durations).
pub fn scan(text: &str, limits: ScanLimits) -> Result<Scanned, ScanError> {
    if text.len() > limits.max_length {
        return Err(ScanError::TooLong {
            length: text.len(),
            max: limits.max_length,
        });
    }
    let tokens = lex(text)?;
    let mut out = Scanned::default();
    let mut normalized = String::with_capacity(text.len());
    for t in &tokens {
        if !normalized.is_empty() {
            normalized.push(' ');
        }
        normalized.push_str(t.text());
    }
    out.normalized = normalized;
    out.depth = nesting(&tokens, limits.max_depth)?;
    facts(&tokens, &mut out)?;
    Ok(out)
}

/// The nesting bound: brackets open a level, and each operator chained at one
/// level may add one more (`1+1+1` is a tree two levels deep). Inside `{}` the
/// operators are label matchers and add nothing.
fn nesting(tokens: &[Tok<'_>], max: usize) -> Result<usize, ScanError> {
    // (bracket, operators counted at this level)
    let mut frames: Vec<(u8, usize)> = Vec::new();
    let mut root_ops = 0usize;
    let mut current = 1usize;
    let mut deepest = 1usize;
    for t in tokens {
        let in_braces = frames.last().is_some_and(|(b, _)| *b == b'{');
        let operator = match t {
            Tok::Op(_) => !in_braces,
            Tok::Ident(w) => !in_braces && OPERATOR_WORDS.iter().any(|o| o.eq_ignore_ascii_case(w)),
            _ => false,
        };
        match t {
            Tok::Open(b) => {
                frames.push((*b, 0));
                current += 1;
            }
            Tok::Close(b) => {
                let want = match b {
                    b')' => b'(',
                    b']' => b'[',
                    _ => b'{',
                };
                match frames.pop() {
                    Some((open, ops)) if open == want => current -= 1 + ops,
                    Some((open, _)) => {
                        return Err(ScanError::Unbalanced(format!(
                            "{:?} closed by {:?}",
                            open as char, *b as char
                        )));
                    }
                    None => {
                        return Err(ScanError::Unbalanced(format!(
                            "{:?} without an opening bracket",
                            *b as char
                        )));
                    }
                }
            }
            _ if operator => {
                match frames.last_mut() {
                    Some((_, ops)) => *ops += 1,
                    None => root_ops += 1,
                }
                current += 1;
            }
            _ => {}
        }
        deepest = deepest.max(current);
        if deepest > max {
            return Err(ScanError::TooDeep {
                depth: deepest,
                max,
            });
        }
    }
    if let Some((open, _)) = frames.last() {
        return Err(ScanError::Unbalanced(format!(
            "{:?} is never closed",
            *open as char
        )));
    }
    debug_assert_eq!(current, 1 + root_ops);
    Ok(deepest)
}

/// Ranges, offsets, `@` and whether series are selected.
fn facts(tokens: &[Tok<'_>], out: &mut Scanned) -> Result<(), ScanError> {
    let mut longest = -1.0f64;
    let mut braces = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        match tokens[i] {
            Tok::Open(b'{') => {
                braces += 1;
                out.selects_series = true;
            }
            Tok::Close(b'}') => braces = braces.saturating_sub(1),
            Tok::Ident(word) if braces == 0 => {
                let called = matches!(tokens.get(i + 1), Some(Tok::Open(b'(')));
                if word.eq_ignore_ascii_case("offset") {
                    let (sign, at) = match tokens.get(i + 1) {
                        Some(Tok::Op("-")) => (-1.0, i + 2),
                        Some(Tok::Op("+")) => (1.0, i + 2),
                        _ => (1.0, i + 1),
                    };
                    if let Some(Tok::Number(d)) = tokens.get(at) {
                        let reach = duration(d)?;
                        if sign < 0.0 {
                            out.offsets_ahead.add(reach);
                        } else {
                            out.offsets_back.add(reach);
                        }
                        i = at;
                    }
                } else if !called && !keyword(word) {
                    out.selects_series = true;
                }
            }
            Tok::Punct("@") => match (tokens.get(i + 1), tokens.get(i + 2)) {
                (Some(Tok::Ident(f)), Some(Tok::Open(b'(')))
                    if f.eq_ignore_ascii_case("start") || f.eq_ignore_ascii_case("end") =>
                {
                    out.uses_range_bounds = true;
                }
                (Some(Tok::Number(n)), _) | (Some(Tok::Op("-")), Some(Tok::Number(n))) => {
                    let negative = matches!(tokens.get(i + 1), Some(Tok::Op("-")));
                    if let Some(secs) = number(n) {
                        let ms = (if negative { -secs } else { secs }) * 1000.0;
                        let ms = ms.clamp(i64::MIN as f64, i64::MAX as f64) as i64;
                        out.at_min = Some(out.at_min.map_or(ms, |m| m.min(ms)));
                        out.at_max = Some(out.at_max.map_or(ms, |m| m.max(ms)));
                    }
                }
                _ => {}
            },
            Tok::Open(b'[') => {
                let close = tokens[i..]
                    .iter()
                    .position(|t| matches!(t, Tok::Close(b']')))
                    .map_or(tokens.len(), |p| i + p);
                let mut range = Reach::default();
                let mut before_colon = true;
                for t in &tokens[i + 1..close] {
                    match t {
                        Tok::Number(d) => {
                            let reach = duration(d)?;
                            if before_colon {
                                range.add(reach);
                            }
                        }
                        Tok::Punct(":") => before_colon = false,
                        _ => {}
                    }
                }
                out.ranges.add(range);
                if range.ms + range.steps > longest {
                    longest = range.ms + range.steps;
                    out.furthest = Some(selector_before(tokens, i, close).into());
                }
                i = close;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// The text of the selector or expression that a `[...]` at `open` applies to,
/// with the brackets: `x{a="b"}[30d]`, or `...[1d:5m]` after a parenthesis.
fn selector_before(tokens: &[Tok<'_>], open: usize, close: usize) -> String {
    let mut from = open;
    if open > 0 {
        match tokens[open - 1] {
            Tok::Close(b'}') => {
                let mut at = open - 1;
                while at > 0 && !matches!(tokens[at], Tok::Open(b'{')) {
                    at -= 1;
                }
                from = if at > 0 && matches!(tokens[at - 1], Tok::Ident(_)) {
                    at - 1
                } else {
                    at
                };
            }
            Tok::Ident(_) => from = open - 1,
            _ => {}
        }
    }
    let end = close.min(tokens.len().saturating_sub(1));
    let mut text = String::new();
    for t in &tokens[from..=end] {
        text.push_str(t.text());
    }
    if from == open {
        text.insert_str(0, "...");
    }
    text
}

/// A number literal's value, for `@` timestamps.
fn number(text: &str) -> Option<f64> {
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).ok().map(|v| v as f64);
    }
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// A duration literal: float seconds (PromQL 3), or number-unit pairs with the
/// units of PromQL and MetricsQL (`ms s m h d w y`, and `i` for steps), fractions
/// allowed as MetricsQL allows them. Text the scan cannot read counts as nothing
/// and is left to the parser and the backend; values past 292 years are refused,
/// since the parser cannot represent them.
fn duration(text: &str) -> Result<Reach, ScanError> {
    let too_long = || ScanError::Duration(text.to_string());
    let max_ms = MAX_DURATION.as_millis() as f64;
    if let Some(secs) = number(text) {
        return if secs.abs() * 1000.0 <= max_ms {
            Ok(Reach {
                ms: secs.abs() * 1000.0,
                steps: 0.0,
            })
        } else {
            Err(too_long())
        };
    }
    if text.parse::<f64>().is_ok() {
        // NaN or an infinity where a duration belongs.
        return Err(too_long());
    }
    let mut reach = Reach::default();
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let Ok(value) = rest[..digits].parse::<f64>() else {
            return Ok(Reach::default());
        };
        rest = &rest[digits..];
        let letters = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit_ms = match &rest[..letters] {
            "ms" => 1.0,
            "s" => 1e3,
            "m" => 6e4,
            "h" => 3.6e6,
            "d" => 8.64e7,
            "w" => 6.048e8,
            "y" => 3.1536e10,
            "i" => {
                reach.steps += value;
                rest = &rest[letters..];
                continue;
            }
            _ => return Ok(Reach::default()),
        };
        reach.ms += value * unit_ms;
        rest = &rest[letters..];
    }
    if reach.ms > max_ms || reach.steps > 1e12 {
        return Err(too_long());
    }
    Ok(reach)
}

/// Split `text` into tokens; whitespace and `#` comments are dropped.
fn lex(text: &str) -> Result<Vec<Tok<'_>>, ScanError> {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let start = i;
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'"' | b'\'' | b'`' => {
                i += 1;
                loop {
                    match bytes.get(i) {
                        None => return Err(ScanError::UnterminatedString(start)),
                        Some(b'\\') if b != b'`' => i += 2,
                        Some(&c) if c == b => {
                            i += 1;
                            break;
                        }
                        Some(_) => i += 1,
                    }
                }
                tokens.push(Tok::Str(&text[start..i.min(bytes.len())]));
            }
            b'(' | b'[' | b'{' => {
                tokens.push(Tok::Open(b));
                i += 1;
            }
            b')' | b']' | b'}' => {
                tokens.push(Tok::Close(b));
                i += 1;
            }
            b'0'..=b'9' => {
                i = number_end(bytes, i);
                tokens.push(Tok::Number(&text[start..i]));
            }
            b'.' if bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                i = number_end(bytes, i);
                tokens.push(Tok::Number(&text[start..i]));
            }
            b'a'..=b'z' | b'A'..=b'Z' | b'_' | b':' if b != b':' || ident_follows(bytes, i) => {
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b':' | b'.'))
                {
                    i += 1;
                }
                tokens.push(Tok::Ident(&text[start..i]));
            }
            b'=' | b'!' | b'<' | b'>' => {
                let two = bytes.get(i + 1).copied();
                i += match (b, two) {
                    (b'=', Some(b'=' | b'~'))
                    | (b'!', Some(b'=' | b'~'))
                    | (b'<', Some(b'='))
                    | (b'>', Some(b'=')) => 2,
                    _ => 1,
                };
                tokens.push(Tok::Op(&text[start..i]));
            }
            b'+' | b'-' | b'*' | b'/' | b'%' | b'^' => {
                i += 1;
                tokens.push(Tok::Op(&text[start..i]));
            }
            _ => {
                // One whole character, so slicing stays on UTF-8 boundaries.
                let width = text[i..].chars().next().map_or(1, char::len_utf8);
                i += width;
                tokens.push(Tok::Punct(&text[start..i]));
            }
        }
    }
    Ok(tokens)
}

/// A `:` starts a name (recording rules are `level:metric:ops`) unless it separates
/// a subquery's range from its step (`[1h:5m]`, `[1h:]`).
fn ident_follows(bytes: &[u8], at: usize) -> bool {
    let before = bytes[..at]
        .iter()
        .rev()
        .find(|b| !b.is_ascii_whitespace())
        .copied();
    let after = bytes.get(at + 1).copied();
    !matches!(before, Some(b'0'..=b'9' | b'[' | b']' | b')'))
        && after.is_some_and(|a| a.is_ascii_alphabetic() || a == b'_' || a == b':')
}

/// Where a number or duration starting at `at` ends: digits, letters (units, hex,
/// exponents), dots, and a sign right after a decimal exponent (`1e-5`).
fn number_end(bytes: &[u8], at: usize) -> usize {
    let hex = bytes.get(at) == Some(&b'0') && matches!(bytes.get(at + 1), Some(b'x' | b'X'));
    let mut i = at;
    while i < bytes.len() {
        let c = bytes[i];
        let exponent_sign = matches!(c, b'+' | b'-')
            && !hex
            && matches!(bytes[i - 1], b'e' | b'E')
            && bytes[at..i - 1]
                .iter()
                .all(|b| b.is_ascii_digit() || *b == b'.')
            && bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
        if c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || exponent_sign {
            i += 1;
        } else {
            break;
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(q: &str) -> Scanned {
        scan(q, ScanLimits::default()).unwrap_or_else(|e| panic!("{q}: {e}"))
    }

    fn err(q: &str) -> ScanError {
        scan(q, ScanLimits::default()).expect_err(q)
    }

    const MIN: f64 = 60_000.0;
    const D: f64 = 86_400_000.0;

    #[test]
    fn ranges_offsets_and_at_are_found_without_knowing_functions() {
        let s = ok(r#"holt_winters(rate(x{a="b"}[5m])[1d:5m], 0.5, 0.5) offset 1h"#);
        assert_eq!(s.ranges.ms, 5.0 * MIN + D);
        assert_eq!(s.offsets_back.ms, 60.0 * MIN);
        assert!(s.selects_series);
        assert_eq!(s.furthest.as_deref(), Some("...[1d:5m]"));

        let s = ok("rate(orders_total[30d]) / rate(orders_total[1h] offset -2h)");
        assert_eq!(s.ranges.ms, 30.0 * D + 60.0 * MIN);
        assert_eq!(s.offsets_ahead.ms, 120.0 * MIN);
        assert_eq!(s.furthest.as_deref(), Some("orders_total[30d]"));

        let s = ok("sum(x @ 1700000000) + y @ -10 + z @ end()");
        assert_eq!(s.at_min, Some(-10_000));
        assert_eq!(s.at_max, Some(1_700_000_000_000));
        assert!(s.uses_range_bounds);
    }

    #[test]
    fn metricsql_is_scanned() {
        let s = ok("rate(x) keep_metric_names");
        assert_eq!(s.ranges, Reach::default());
        assert!(s.selects_series);
        let s = ok("WITH (f(q) = rate(q[1i])) f(http_requests_total{code=~'5..'}) default 0");
        assert_eq!(s.ranges.steps, 1.0);
        assert_eq!(s.ranges.at_step(60_000), 60_000);
        let s = ok("sum(rate(x[1.5h]))");
        assert_eq!(s.ranges.ms, 90.0 * MIN);
        let s = ok("level:metric:rate5m[1h:]");
        assert_eq!(s.ranges.ms, 60.0 * MIN);
        assert!(s.selects_series);
    }

    #[test]
    fn queries_that_read_nothing() {
        for q in [
            "1+1",
            "vector(1)",
            "time()",
            "scalar(vector(2)) * 3",
            "-Inf",
            "NaN",
        ] {
            assert!(!ok(q).selects_series, "{q}");
        }
    }

    #[test]
    fn normalized_text_ignores_whitespace_and_comments_only() {
        assert_eq!(
            ok("sum by(a)(rate( x[5m] ))").normalized,
            ok("sum  by (a) (\n rate(x [5m]) # per second\n)").normalized
        );
        assert_ne!(
            ok(r#"x{a="1 2"}"#).normalized,
            ok(r#"x{a="1  2"}"#).normalized
        );
        assert_ne!(ok("a - b").normalized, ok("a + b").normalized);
        assert_eq!(ok("1e-5 - 2").normalized, "1e-5 - 2");
        assert_eq!(ok("x[5m]-1").normalized, "x [ 5m ] - 1");
    }

    #[test]
    fn nesting_is_bounded_before_any_parser_sees_it() {
        let deep = format!("{}up{}", "(".repeat(7_500), ")".repeat(7_500));
        assert!(matches!(err(&deep), ScanError::TooDeep { max: 256, .. }));
        let chain = vec!["1"; 10_000].join("+");
        assert!(matches!(err(&chain), ScanError::TooDeep { .. }));
        let at_limit = format!("{}up{}", "abs(".repeat(255), ")".repeat(255));
        assert_eq!(ok(&at_limit).depth, 256);
        let over = format!("{}up{}", "abs(".repeat(256), ")".repeat(256));
        assert!(matches!(err(&over), ScanError::TooDeep { depth: 257, .. }));
        // Matchers inside braces are not operators.
        let many = format!("x{{{}}}", vec!["a=\"1\""; 400].join(","));
        assert_eq!(ok(&many).depth, 2);
        assert!(matches!(
            err(&"x".repeat(200_000)),
            ScanError::TooLong {
                length: 200_000,
                ..
            }
        ));
    }

    #[test]
    fn what_no_backend_accepts_is_refused() {
        for q in ["sum(rate(x[5m])", "x)", "(]", "x{a=\"b\"", "rate(x[5m)"] {
            assert!(matches!(err(q), ScanError::Unbalanced(_)), "{q}");
        }
        assert_eq!(err("x{a=\"b}"), ScanError::UnterminatedString(4));
        for q in [
            "up[1e300]",
            "up offset 1e300",
            "up[1e300:1m]",
            "up[5m:1e300]",
            "x offset -1e300",
            "up[300y]",
            "up offset 9999999999999999y",
        ] {
            assert!(matches!(err(q), ScanError::Duration(_)), "{q}");
        }
        assert!(scan("up[292y]", ScanLimits::default()).is_ok());
    }

    #[test]
    fn odd_text_never_panics() {
        for q in [
            "", "@", "[", "]", "offset", "offset -", "x @ -", "é{}", ":", "[:]", "0x", "1e", "\\",
        ] {
            let _ = scan(q, ScanLimits::default());
        }
    }
}
