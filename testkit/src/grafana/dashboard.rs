//! A Grafana dashboard's JSON model, and the emulator that opens one: the calls Grafana
//! makes for its variables and for each target of each panel. Reads a file; otherwise
//! pure.
//!
//! The schema holds what the curated dashboards' lints check and what the emulator
//! reads; a dashboard missing any of it does not load. Variables are opened with
//! everything selected (a multi-value variable's "All" value).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::interval::{DataSource, Resolution, Sizing, parse_interval};
use super::request::Call;

#[derive(Debug, Deserialize)]
pub struct Dashboard {
    pub uid: String,
    pub title: String,
    pub tags: Vec<String>,
    pub refresh: String,
    pub time: TimeRange,
    pub timepicker: Timepicker,
    pub templating: Templating,
    pub panels: Vec<Panel>,
}

#[derive(Debug, Deserialize)]
pub struct TimeRange {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Deserialize)]
pub struct Timepicker {
    pub refresh_intervals: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct Templating {
    pub list: Vec<Variable>,
}

#[derive(Debug, Deserialize)]
pub struct Variable {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    /// A plugin id for a `datasource` variable, a query object for a `query` one.
    pub query: Value,
    pub datasource: Option<Value>,
    pub definition: Option<String>,
    #[serde(rename = "includeAll", default)]
    pub include_all: bool,
    #[serde(rename = "allValue")]
    pub all_value: Option<String>,
    pub current: Value,
}

#[derive(Debug, Deserialize)]
pub struct Panel {
    pub id: u32,
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    pub datasource: Option<Value>,
    #[serde(rename = "gridPos")]
    pub grid_pos: GridPos,
    /// The panel's min interval.
    pub interval: Option<String>,
    #[serde(rename = "maxDataPoints")]
    pub max_data_points: Option<i64>,
    /// A relative time override (`1h`): the panel shows the last `time_from` instead of
    /// the dashboard's range.
    #[serde(rename = "timeFrom")]
    pub time_from: Option<String>,
    #[serde(rename = "fieldConfig")]
    pub field_config: Option<Value>,
    #[serde(default)]
    pub targets: Vec<Target>,
    /// A collapsed row keeps its panels inside it.
    #[serde(default)]
    pub panels: Vec<Panel>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
pub struct GridPos {
    pub x: i64,
    pub y: i64,
    pub w: i64,
    pub h: i64,
}

#[derive(Debug, Deserialize)]
pub struct Target {
    #[serde(rename = "refId")]
    pub ref_id: String,
    pub expr: String,
    pub datasource: Value,
    /// The target's min step; also the scrape interval of its `$__rate_interval`.
    pub interval: Option<String>,
    /// Grafana's query type: an instant query at the range's end, a range query over
    /// it, or both; neither is a range query (older dashboards).
    #[serde(default)]
    pub instant: bool,
    #[serde(default)]
    pub range: bool,
    /// `table` for a table panel's target, whose rows Grafana builds from one instant.
    pub format: Option<String>,
    /// Hidden targets are not sent.
    #[serde(default)]
    pub hide: bool,
}

/// What a `label_values(...)` variable asks Prometheus for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelValues {
    /// The series selector, when the definition has one.
    pub matcher: Option<String>,
    pub label: String,
}

/// A viewer's screen, which sizes panels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Screen {
    pub width_px: i64,
}

impl Screen {
    /// A panel `cols` of the dashboard's 24 grid columns wide, in pixels, which is what
    /// Grafana sends as `maxDataPoints` for a panel without its own: the screen minus
    /// the side menu (100 px) and the panel's padding (16 px), at least 100.
    pub fn panel_px(self, cols: i64) -> i64 {
        ((self.width_px - 100) * cols / 24 - 16).max(100)
    }
}

impl Dashboard {
    /// # Panics
    ///
    /// When the file cannot be read or is not a dashboard of this schema: for the
    /// curated dashboards either is a defect of the repository.
    pub fn load(path: &Path) -> Dashboard {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Every panel that queries, rows' nested panels included, in the file's order.
    pub fn query_panels(&self) -> Vec<&Panel> {
        self.panels
            .iter()
            .flat_map(|p| std::iter::once(p).chain(&p.panels))
            .filter(|p| p.kind != "row")
            .collect()
    }

    pub fn query_variables(&self) -> impl Iterator<Item = &Variable> {
        self.templating.list.iter().filter(|v| v.kind == "query")
    }

    /// The length of the dashboard's time range, `now-<interval>` to `now`.
    ///
    /// # Errors
    ///
    /// For any other range.
    pub fn range_ms(&self) -> Result<i64, String> {
        let from = self
            .time
            .from
            .strip_prefix("now-")
            .filter(|_| self.time.to == "now");
        let from = from.ok_or_else(|| {
            format!(
                "{}: time {:?} to {:?} is not now-<interval> to now",
                self.uid, self.time.from, self.time.to
            )
        })?;
        parse_interval(from).map_err(|e| format!("{}: time.from: {e}", self.uid))
    }

    /// The values Grafana substitutes for the dashboard's variables when everything
    /// is selected.
    ///
    /// # Errors
    ///
    /// A query variable without an "All" value.
    pub fn all_selected(&self) -> Result<BTreeMap<String, String>, String> {
        self.query_variables()
            .map(|v| {
                let all = v.all_value.clone().filter(|_| v.include_all);
                let all =
                    all.ok_or_else(|| format!("{}: ${} needs an All value", self.uid, v.name))?;
                Ok((v.name.clone(), all))
            })
            .collect()
    }

    /// The calls Grafana makes for `target` of `panel` on `screen`, with `variables`
    /// for the dashboard's own: none for a hidden or empty target, a range and an
    /// instant call for a target that asks for both.
    ///
    /// # Errors
    ///
    /// An interval the model cannot read, or an undefined variable.
    pub fn calls(
        &self,
        panel: &Panel,
        target: &Target,
        variables: &BTreeMap<String, String>,
        data_source: DataSource,
        screen: Screen,
    ) -> Result<Vec<Call>, String> {
        if target.hide || target.expr.is_empty() {
            return Ok(Vec::new());
        }
        let range_ms = match &panel.time_from {
            Some(from) => parse_interval(from)?,
            None => self.range_ms()?,
        };
        let optional = |text: &Option<String>| text.as_deref().map(parse_interval).transpose();
        let sizing = Sizing {
            max_data_points: panel
                .max_data_points
                .unwrap_or_else(|| screen.panel_px(panel.grid_pos.w)),
            panel_min_interval_ms: optional(&panel.interval)?,
            target_min_step_ms: optional(&target.interval)?,
        };
        let resolution = Resolution::new(range_ms, sizing, data_source);
        let mut calls = Vec::new();
        if target.range || !target.instant {
            calls.push(Call::range(&target.expr, &resolution, variables)?);
        }
        if target.instant {
            calls.push(Call::instant(&target.expr, &resolution, variables)?);
        }
        Ok(calls)
    }
}

impl Variable {
    /// What a `label_values(selector, label)` or `label_values(label)` definition
    /// asks for; `None` for any other definition.
    pub fn label_values(&self) -> Option<LabelValues> {
        let inner = self
            .definition
            .as_deref()?
            .trim()
            .strip_prefix("label_values(")?
            .strip_suffix(')')?;
        Some(match inner.rsplit_once(',') {
            Some((matcher, label)) => LabelValues {
                matcher: Some(matcher.trim().to_string()),
                label: label.trim().to_string(),
            },
            None => LabelValues {
                matcher: None,
                label: inner.trim().to_string(),
            },
        })
    }

    /// The call that resolves this variable over the last `range_ms`.
    pub fn call(&self, range_ms: i64) -> Option<Call> {
        let LabelValues { matcher, label } = self.label_values()?;
        Some(Call::LabelValues {
            label: label.into(),
            matcher: matcher.map(Into::into),
            range_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grafana::interval::{HOUR, SECOND};
    use crate::repo;

    #[test]
    fn a_curated_dashboard_opens_as_grafana_opens_it() {
        let board = Dashboard::load(&repo().join("dashboards/orders.json"));
        let variables = board
            .all_selected()
            .expect("every variable has an All value");
        let screen = Screen { width_px: 1920 };
        let panel = board
            .query_panels()
            .into_iter()
            .find(|p| p.id == 6)
            .expect("orders.json has its panel 6");
        let mut calls = Vec::new();
        for target in &panel.targets {
            let sent = board.calls(
                panel,
                target,
                &variables,
                DataSource::GRAFANA_DEFAULT,
                screen,
            );
            calls.extend(sent.expect("the panel's targets are well formed"));
        }
        // Panel min interval 30 s; target C has its own min step of 5 m.
        let steps: Vec<_> = calls.iter().map(|c| c.step_ms()).collect();
        assert_eq!(
            steps,
            [Some(30 * SECOND), Some(30 * SECOND), Some(300 * SECOND)]
        );
        assert!(
            calls
                .iter()
                .filter_map(Call::expr)
                .all(|e| !e.contains('$')),
            "{calls:?}"
        );
        assert_eq!(board.range_ms(), Ok(6 * HOUR));
    }

    #[test]
    fn variables_ask_for_label_values() {
        let variable = |definition: &str| Variable {
            kind: "query".into(),
            name: "region".into(),
            query: Value::Null,
            datasource: None,
            definition: Some(definition.into()),
            include_all: true,
            all_value: Some(".*".into()),
            current: Value::Null,
        };
        assert_eq!(
            variable("label_values(shop_orders_total{status=\"paid\"}, region)").label_values(),
            Some(LabelValues {
                matcher: Some("shop_orders_total{status=\"paid\"}".into()),
                label: "region".into(),
            })
        );
        assert_eq!(
            variable("label_values(region)").label_values(),
            Some(LabelValues {
                matcher: None,
                label: "region".into()
            })
        );
        assert_eq!(variable("query_result(up)").label_values(), None);
    }
}
