//! A Grafana dashboard's JSON model, and the emulator that opens one: the calls Grafana
//! makes for its variables and for each target of each panel. Reads a file; otherwise
//! pure.
//!
//! The schema holds what the curated dashboards' lints check and what the emulator
//! reads; what a dashboard leaves out takes Grafana's default (a dashboard exported
//! from any Grafana loads). Variables are opened with everything selected (a
//! multi-value variable's "All" value), or as saved ([`Dashboard::opened`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::interval::{DataSource, Resolution, Sizing, parse_interval};
use super::request::Call;

/// A dashboard's JSON model, as far as Grafana's requests depend on it.
#[derive(Debug, Deserialize)]
pub struct Dashboard {
    /// The dashboard's uid (`X-Dashboard-Uid` on its requests).
    #[serde(default)]
    pub uid: String,
    /// Its title, for logs and reports.
    #[serde(default)]
    pub title: String,
    /// Its tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Its auto-refresh interval (`30s`), empty for none.
    #[serde(default)]
    pub refresh: String,
    /// The time range it opens with.
    #[serde(default)]
    pub time: TimeRange,
    /// The time picker's settings.
    #[serde(default)]
    pub timepicker: Timepicker,
    /// Its variables.
    #[serde(default)]
    pub templating: Templating,
    /// Its panels, rows' nested panels inside the rows.
    #[serde(default)]
    pub panels: Vec<Panel>,
}

/// A dashboard's time range, in Grafana's relative syntax (`now-6h`).
#[derive(Debug, Deserialize)]
pub struct TimeRange {
    /// Where it starts, e.g. `now-30d`.
    pub from: String,
    /// Where it ends, `now` for a live dashboard.
    pub to: String,
}

impl Default for TimeRange {
    /// Grafana's default for a new dashboard: the last 6 hours.
    fn default() -> Self {
        TimeRange {
            from: "now-6h".into(),
            to: "now".into(),
        }
    }
}

/// The time picker's settings.
#[derive(Debug, Deserialize, Default)]
pub struct Timepicker {
    /// The auto-refresh intervals a viewer may pick.
    #[serde(default)]
    pub refresh_intervals: Vec<String>,
}

/// The dashboard's variables.
#[derive(Debug, Deserialize, Default)]
pub struct Templating {
    /// In the order Grafana resolves them.
    #[serde(default)]
    pub list: Vec<Variable>,
}

/// One dashboard variable.
#[derive(Debug, Deserialize)]
pub struct Variable {
    /// `query`, `custom`, `constant`, `interval`, `datasource`, `textbox`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The name expressions use as `$name`.
    pub name: String,
    /// A plugin id for a `datasource` variable, a query object for a `query` one.
    #[serde(default)]
    pub query: Value,
    /// The data source a `query` variable asks.
    pub datasource: Option<Value>,
    /// A `query` variable's definition, e.g. `label_values(up, job)`.
    pub definition: Option<String>,
    /// Whether "All" can be selected.
    #[serde(rename = "includeAll", default)]
    pub include_all: bool,
    /// What "All" stands for in expressions; Grafana lists every value without it.
    #[serde(rename = "allValue")]
    pub all_value: Option<String>,
    /// The saved selection: `{"value": "eu"}`, a list for a multi-value variable,
    /// `$__all` for "All".
    #[serde(default)]
    pub current: Value,
}

/// One panel, or a row holding panels.
#[derive(Debug, Deserialize)]
pub struct Panel {
    /// Its id within the dashboard (`X-Panel-Id`).
    #[serde(default)]
    pub id: u32,
    /// The panel type (`timeseries`, `stat`, `table`, `row`).
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Its title.
    #[serde(default)]
    pub title: String,
    /// Its description.
    #[serde(default)]
    pub description: String,
    /// Its data source, unless its targets name their own.
    pub datasource: Option<Value>,
    /// Its place and size on the dashboard's 24-column grid.
    #[serde(rename = "gridPos", default)]
    pub grid_pos: GridPos,
    /// The panel's min interval.
    pub interval: Option<String>,
    /// Its own `maxDataPoints`, when set: else its width in pixels sizes the step.
    #[serde(rename = "maxDataPoints")]
    pub max_data_points: Option<i64>,
    /// A relative time override (`1h`): the panel shows the last `time_from` instead of
    /// the dashboard's range.
    #[serde(rename = "timeFrom")]
    pub time_from: Option<String>,
    /// Its field configuration (units, thresholds).
    #[serde(rename = "fieldConfig")]
    pub field_config: Option<Value>,
    /// The queries it sends.
    #[serde(default)]
    pub targets: Vec<Target>,
    /// A collapsed row keeps its panels inside it.
    #[serde(default)]
    pub panels: Vec<Panel>,
}

/// A panel's place and size on the 24-column grid.
#[derive(Debug, Deserialize, Clone, Copy)]
pub struct GridPos {
    /// Column of its left edge.
    pub x: i64,
    /// Row of its top edge.
    pub y: i64,
    /// Width, in columns.
    pub w: i64,
    /// Height, in rows.
    pub h: i64,
}

impl Default for GridPos {
    /// A new panel's size in Grafana: half the width.
    fn default() -> Self {
        GridPos {
            x: 0,
            y: 0,
            w: 12,
            h: 8,
        }
    }
}

/// One query of a panel.
#[derive(Debug, Deserialize)]
pub struct Target {
    /// Its letter within the panel (`A`).
    #[serde(rename = "refId", default)]
    pub ref_id: String,
    /// Empty for targets of other data sources, which are not sent here.
    #[serde(default)]
    pub expr: String,
    /// The data source it is sent to.
    #[serde(default)]
    pub datasource: Value,
    /// The target's min step; also the scrape interval of its `$__rate_interval`.
    pub interval: Option<String>,
    /// Grafana's query type: an instant query at the range's end, a range query over
    /// it, or both; neither is a range query (older dashboards).
    #[serde(default)]
    pub instant: bool,
    /// Whether it is also sent as a range query, when `instant` is set.
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
    /// The label whose values it asks for.
    pub label: String,
}

/// A viewer's screen, which sizes panels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Screen {
    /// The screen's width in pixels.
    pub width_px: i64,
}

impl Screen {
    /// A panel `cols` of the dashboard's 24 grid columns wide, in pixels, which is what
    /// Grafana sends as `maxDataPoints` for a panel without its own: the screen minus
    /// the side menu (100 px) and the panel's padding (16 px), at least 100.
    pub fn panel_px(self, cols: i64) -> i64 {
        (self.width_px.saturating_sub(100).saturating_mul(cols) / 24 - 16).max(100)
    }
}

impl Dashboard {
    /// The dashboard in the file at `path`: a dashboard's JSON model, or the API's
    /// `{"dashboard": …}` envelope around one.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or is not a dashboard; the message names the file.
    pub fn load(path: &Path) -> Result<Dashboard, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        Dashboard::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The dashboard in `text`, as [`Dashboard::load`] reads it.
    ///
    /// # Errors
    ///
    /// Not JSON, or not a dashboard.
    pub fn parse(text: &str) -> Result<Dashboard, String> {
        Dashboard::from_value(serde_json::from_str(text).map_err(|e| e.to_string())?)
    }

    /// The dashboard in `value`, as [`Dashboard::load`] reads it.
    ///
    /// # Errors
    ///
    /// Not a dashboard.
    pub fn from_value(value: Value) -> Result<Dashboard, String> {
        let model = match value {
            Value::Object(mut envelope)
                if envelope.get("dashboard").is_some_and(Value::is_object) =>
            {
                envelope.remove("dashboard").unwrap_or_default()
            }
            other => other,
        };
        serde_json::from_value(model).map_err(|e| e.to_string())
    }

    /// Every panel that queries, rows' nested panels included, in the file's order.
    pub fn query_panels(&self) -> Vec<&Panel> {
        self.panels
            .iter()
            .flat_map(|p| std::iter::once(p).chain(&p.panels))
            .filter(|p| p.kind != "row")
            .collect()
    }

    /// The variables whose values come from a query.
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

    /// The values Grafana substitutes for the dashboard's variables when it opens as
    /// saved: each variable's current selection, a multi-value one as Grafana writes
    /// it for Prometheus (`(a|b)`, each value regex-escaped), "All" as the
    /// variable's All value or `.*`.
    pub fn opened(&self) -> BTreeMap<String, String> {
        self.templating
            .list
            .iter()
            .filter_map(|v| {
                let current = v.current.get("value").unwrap_or(&v.current);
                let all = || v.all_value.clone().unwrap_or_else(|| ".*".into());
                let value = match current {
                    Value::String(s) if s == "$__all" => all(),
                    Value::String(s) => s.clone(),
                    Value::Array(values) => {
                        let values: Vec<&str> = values.iter().filter_map(Value::as_str).collect();
                        match values.as_slice() {
                            [] => return None,
                            ["$__all", ..] => all(),
                            [one] => (*one).to_string(),
                            many => format!(
                                "({})",
                                many.iter()
                                    .map(|s| regex::escape(s))
                                    .collect::<Vec<_>>()
                                    .join("|")
                            ),
                        }
                    }
                    _ => return None,
                };
                Some((v.name.clone(), value))
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
        self.calls_over(panel, target, variables, data_source, screen, None)
    }

    /// [`Dashboard::calls`] with the dashboard's time range set to the last
    /// `range_ms` (a panel's own relative time still wins), as when a viewer picks
    /// it in the time picker.
    ///
    /// # Errors
    ///
    /// As [`Dashboard::calls`].
    pub fn calls_over(
        &self,
        panel: &Panel,
        target: &Target,
        variables: &BTreeMap<String, String>,
        data_source: DataSource,
        screen: Screen,
        range_ms: Option<i64>,
    ) -> Result<Vec<Call>, String> {
        if target.hide || target.expr.is_empty() {
            return Ok(Vec::new());
        }
        let range_ms = match (&panel.time_from, range_ms) {
            (Some(from), _) => parse_interval(from)?,
            (None, Some(range)) => range,
            (None, None) => self.range_ms()?,
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

    fn repo() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn a_dashboard_opens_as_saved_with_grafanas_defaults_for_what_it_leaves_out() {
        let board = Dashboard::parse(
            r#"{"dashboard": {"uid": "mine", "templating": {"list": [
                {"type": "custom", "name": "env", "current": {"value": "prod"}},
                {"type": "query", "name": "region", "current": {"value": ["eu-1", "us.east"]}},
                {"type": "query", "name": "job", "includeAll": true, "current": {"value": "$__all"}},
                {"type": "query", "name": "shard", "allValue": ".+", "current": {"value": ["$__all"]}}
            ]}, "panels": [{"targets": [{"expr": "up"}]}]}}"#,
        )
        .unwrap();
        let opened = board.opened();
        assert_eq!(opened["env"], "prod");
        assert_eq!(opened["region"], r"(eu\-1|us\.east)");
        assert_eq!(opened["job"], ".*");
        assert_eq!(opened["shard"], ".+");
        assert_eq!(board.range_ms(), Ok(6 * HOUR));
        let panel = board.query_panels()[0];
        assert_eq!(panel.grid_pos.w, 12);
        let calls = board
            .calls_over(
                panel,
                &panel.targets[0],
                &opened,
                DataSource::GRAFANA_DEFAULT,
                Screen { width_px: 1920 },
                Some(30 * 24 * HOUR),
            )
            .unwrap();
        // 30 days over a half-width panel of 894 px: 48 minutes a point, an hour.
        assert_eq!(calls[0].step_ms(), Some(HOUR));
        assert!(Dashboard::parse("[1]").is_err());
    }

    #[test]
    fn a_curated_dashboard_opens_as_grafana_opens_it() {
        let board = Dashboard::load(&repo().join("dashboards/orders.json")).unwrap();
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
