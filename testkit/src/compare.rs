//! Comparing Prometheus API answers: exactly for Prometheus, within a relative
//! tolerance for VictoriaMetrics, whose own cache changes the last digits between
//! calls; pure.

use serde_json::Value;

/// Compare two API answers. Prometheus answers must be equal exactly (as strings);
/// VictoriaMetrics' own cache changes the last digits between calls, so sample
/// values may differ by a relative `tolerance`.
///
/// # Panics
///
/// When they differ, naming where.
pub fn assert_same_answer(got: &Value, want: &Value, tolerance: f64, what: &str) {
    if let Some(path) = differs(got, want, tolerance) {
        panic!("{what}: answers differ at {path}\n got: {got}\nwant: {want}");
    }
}

/// Where two answers differ (as [`assert_same_answer`] compares them), if they do.
pub fn differs(got: &Value, want: &Value, tolerance: f64) -> Option<String> {
    same(got, want, tolerance, String::new()).err()
}

fn same(a: &Value, b: &Value, tol: f64, path: String) -> Result<(), String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            if x.len() != y.len() {
                return Err(format!("{path} (keys)"));
            }
            for (k, v) in x {
                let w = y.get(k).ok_or_else(|| format!("{path}.{k} (missing)"))?;
                same(v, w, tol, format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                return Err(format!("{path} (length {} vs {})", x.len(), y.len()));
            }
            x.iter()
                .zip(y)
                .enumerate()
                .try_for_each(|(i, (v, w))| same(v, w, tol, format!("{path}[{i}]")))
        }
        (Value::String(x), Value::String(y)) if x != y && tol > 0.0 => {
            match (x.parse::<f64>(), y.parse::<f64>()) {
                (Ok(p), Ok(q)) if (p - q).abs() <= tol * p.abs().max(q.abs()) => Ok(()),
                _ => Err(path),
            }
        }
        _ if a == b => Ok(()),
        _ => Err(path),
    }
}

/// A matrix answer with only the points whose timestamp (seconds) passes `keep`,
/// and without the series left empty: to compare a part of a stitched answer.
pub fn points_where(answer: &Value, keep: impl Fn(f64) -> bool) -> Value {
    let mut part = answer.clone();
    if let Some(series) = part
        .pointer_mut("/data/result")
        .and_then(Value::as_array_mut)
    {
        for s in series.iter_mut() {
            if let Some(values) = s["values"].as_array_mut() {
                values.retain(|p| p[0].as_f64().is_some_and(&keep));
            }
        }
        series.retain(|s| s["values"].as_array().is_some_and(|v| !v.is_empty()));
    }
    part
}

/// Sort a result array by its `metric` labels, since some endpoints (series, VM's
/// matrices) do not promise an order.
pub fn sorted_by_metric(mut v: Value) -> Value {
    if let Some(arr) = v.pointer_mut("/data/result").and_then(Value::as_array_mut) {
        arr.sort_by_key(|s| s["metric"].to_string());
    }
    if let Some(arr) = v.pointer_mut("/data").and_then(Value::as_array_mut) {
        arr.sort_by_key(|s| s.to_string());
    }
    v
}
