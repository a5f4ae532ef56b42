//! Variables in a target's expression, replaced as Grafana replaces them before the
//! query leaves for Prometheus; pure.
//!
//! The browser replaces the dashboard's own variables (`templateSrv.replace` in the
//! data source's `applyTemplateVariables`); the server the built-in ones
//! (`interpolateVariables` in `pkg/promlib/models/query.go`): `$__interval` is the step
//! in its largest whole unit, `$__interval_ms` the step in milliseconds, `$__range` the
//! range in rounded seconds with an `s`, `$__range_s` and `$__range_ms` the same as
//! numbers, `$__rate_interval` Go's rendering of the rate interval (`1m0s`) and
//! `$__rate_interval_ms` it in milliseconds; each as `$name` or `${name}`.

use std::collections::BTreeMap;

use super::interval::{Resolution, format_go_duration, format_interval};

/// `expr` with every `$name` and `${name}` replaced, dashboard variables from
/// `variables` and Grafana's built-ins from `resolution`. A `$` not followed by a name
/// (a regex anchor) stays.
///
/// # Errors
///
/// A name that is neither: Grafana would send it as literal text, and inside a label
/// matcher's string Prometheus would accept the typo.
pub fn interpolate(
    expr: &str,
    variables: &BTreeMap<String, String>,
    resolution: &Resolution,
) -> Result<String, String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, used) = match after.strip_prefix('{') {
            Some(braced) => {
                let close = braced.find('}').ok_or("an unclosed ${")?;
                (&braced[..close], close + 2)
            }
            None => {
                let len = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..len], len)
            }
        };
        if name.is_empty() {
            out.push('$');
        } else {
            match built_in(name, resolution).or_else(|| variables.get(name).cloned()) {
                Some(value) => out.push_str(&value),
                None => return Err(format!("undefined variable ${name}")),
            }
        }
        rest = &after[used..];
    }
    out.push_str(rest);
    Ok(out)
}

fn built_in(name: &str, r: &Resolution) -> Option<String> {
    // `math.Round` of the seconds, half away from zero like `f64::round`.
    let range_s = (r.range_ms as f64 / 1000.0).round() as i64;
    Some(match name {
        "__interval" => format_interval(r.step_ms),
        "__interval_ms" => r.step_ms.to_string(),
        "__range" => format!("{range_s}s"),
        "__range_s" => range_s.to_string(),
        "__range_ms" => r.range_ms.to_string(),
        "__rate_interval" => format_go_duration(r.rate_interval_ms),
        "__rate_interval_ms" => r.rate_interval_ms.to_string(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grafana::interval::{HOUR, MINUTE, SECOND};

    const SIX_HOURS: Resolution = Resolution {
        range_ms: 6 * HOUR,
        interval_ms: 30 * SECOND,
        step_ms: 90 * SECOND,
        rate_interval_ms: 75 * SECOND,
    };

    fn vars() -> BTreeMap<String, String> {
        [("region", "moscow|kazan"), ("regions", ".*")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn built_ins_as_the_server_writes_them() {
        for (expr, want) in [
            ("rate(x[$__rate_interval])", "rate(x[1m15s])"),
            ("rate(x[${__rate_interval}])", "rate(x[1m15s])"),
            ("$__rate_interval_ms", "75000"),
            // The step is 90 s; `$__interval` truncates it to its largest unit.
            ("avg_over_time(x[$__interval])", "avg_over_time(x[1m])"),
            ("$__interval_ms/${__interval}", "90000/1m"),
            ("increase(x[$__range])", "increase(x[21600s])"),
            ("$__range_s $__range_ms", "21600 21600000"),
        ] {
            assert_eq!(
                interpolate(expr, &BTreeMap::new(), &SIX_HOURS),
                Ok(want.to_string()),
                "{expr}"
            );
        }
    }

    #[test]
    fn dashboard_variables_by_whole_name() {
        assert_eq!(
            interpolate(
                r#"x{region=~"$region", a=~"${regions}", b=~"^a$"}"#,
                &vars(),
                &SIX_HOURS
            ),
            Ok(r#"x{region=~"moscow|kazan", a=~".*", b=~"^a$"}"#.to_string())
        );
        assert_eq!(
            interpolate(r#"x{region=~"$regoin"}"#, &vars(), &SIX_HOURS),
            Err("undefined variable $regoin".to_string())
        );
        assert_eq!(
            interpolate("x[${__range]", &vars(), &SIX_HOURS),
            Err("an unclosed ${".to_string())
        );
    }

    #[test]
    fn range_seconds_round_half_away_from_zero() {
        let r = Resolution {
            range_ms: MINUTE + 500,
            ..SIX_HOURS
        };
        assert_eq!(
            interpolate("$__range", &BTreeMap::new(), &r),
            Ok("61s".to_string())
        );
    }
}
