//! Stage 1, identify: who is asking.
//!
//! Input: request headers and the client address. Output: a [`Caller`] (user, how
//! we know it, org, dashboard, panel). `X-Grafana-User` is believed only from a
//! request that proves it came through the trusted Grafana. Pure except for a
//! one-time warning log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::{HeaderMap, HeaderName, header};
use base64::Engine;
use subtle::ConstantTimeEq;

use crate::config::IdentityConfig;

/// How the user name was established. Feeds metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `X-Grafana-User` from a request proven to come via the trusted Grafana.
    GrafanaUser,
    /// The trusted Grafana, without a user header (`send_user_header` off).
    Grafana,
    /// A user of `identity.users`, by basic auth.
    BasicAuth,
    /// A script or alerting job by one of `identity.bearer_tokens`.
    Bearer,
    /// No credentials: known by client address (`anonymous@<ip>`).
    Anonymous,
}

impl Source {
    /// Every label [`Caller::identity_label`] can give, for exporting zeros.
    pub const LABELS: [&'static str; 6] = [
        "grafana_user",
        "grafana",
        "grafana_unproven",
        "basic_auth",
        "bearer",
        "anonymous",
    ];

    /// The `source` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::GrafanaUser => "grafana_user",
            Source::Grafana => "grafana",
            Source::BasicAuth => "basic_auth",
            Source::Bearer => "bearer",
            Source::Anonymous => "anonymous",
        }
    }
}

/// The identity every later stage sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Who it is: a login, a configured user, `grafana` (the trusted Grafana
    /// without a user header) or `anonymous@<ip>`.
    pub user: Arc<str>,
    /// How `user` was established; decides whether it is one person.
    pub source: Source,
    /// The TCP peer's address: promguard reads no forwarding headers.
    pub client: IpAddr,
    /// `X-Grafana-Org-Id`, for the request log only.
    pub org: Option<String>,
    /// `X-Dashboard-Uid`; `None` for Explore and clients other than Grafana. Decides
    /// the priority class (curated only where the header can be believed) and, with
    /// `limits.unverified: per_dashboard`, the budget key.
    pub dashboard: Option<String>,
    /// `X-Panel-Id`, for the request log only.
    pub panel: Option<String>,
    /// The request carries Grafana's own headers (its `User-Agent`, org or data
    /// source id): it came through a Grafana, proven or not, and so may stand for
    /// any of its users.
    pub from_grafana: bool,
}

impl Caller {
    /// promguard's own warming ([`crate::warm`]), from `client`: one caller, of no
    /// dashboard, so of Explore's class.
    pub fn warming(client: IpAddr) -> Caller {
        Caller {
            user: "promguard-warm".into(),
            source: Source::Bearer,
            client,
            org: None,
            dashboard: None,
            panel: None,
            from_grafana: false,
        }
    }

    /// Where the identity came from, for the `promguard_identity_requests_total`
    /// label: the [`Source`], with anonymous requests that carry Grafana's
    /// headers told apart as `grafana_unproven`.
    pub fn identity_label(&self) -> &'static str {
        match self.source {
            Source::Anonymous if self.from_grafana => "grafana_unproven",
            source => source.as_str(),
        }
    }

    /// The caller is one known person or client: a Grafana login proven by the
    /// trusted Grafana, a basic-auth user, a bearer token, or an address that is
    /// not a Grafana. Otherwise (Grafana without a verified user header) one
    /// identity stands for many people.
    pub fn is_one_person(&self) -> bool {
        match self.source {
            Source::GrafanaUser | Source::BasicAuth | Source::Bearer => true,
            Source::Grafana => false,
            Source::Anonymous => !self.from_grafana,
        }
    }
}

/// Why a request's credentials were refused (401). Credentials that cannot be
/// verified are never downgraded to anonymous, so a misconfigured client finds out
/// at once.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// Basic auth with a user or password that matches neither the trusted Grafana
    /// nor `identity.users`.
    #[error("invalid credentials")]
    BadCredentials,
    /// A bearer token that is none of `identity.bearer_tokens`.
    #[error("unknown bearer token")]
    UnknownToken,
    /// An `Authorization` header promguard cannot read: another scheme, bad base64,
    /// no `user:password`, an empty token.
    #[error(
        "the Authorization header is not valid Basic or Bearer credentials; send \
         `Basic <base64 of user:password>` or `Bearer <token>`, or no Authorization header"
    )]
    Malformed,
}

/// Credentials from the configuration, prepared for lookups.
#[derive(Debug)]
pub struct Identifier {
    grafana_header: Option<(HeaderName, Vec<u8>)>,
    grafana_basic: Option<(String, Vec<u8>)>,
    users: HashMap<String, Vec<u8>>,
    tokens: Vec<(Vec<u8>, Arc<str>)>,
    /// The untrusted `X-Grafana-User` warning is logged once per process; every
    /// occurrence is still counted in metrics by the caller.
    warned_untrusted: AtomicBool,
    /// Grafana's headers without proof, and the proven Grafana without a user
    /// header: each explained once per process, with what to configure.
    warned_unproven: AtomicBool,
    warned_no_user_header: AtomicBool,
    /// No way for Grafana to prove itself is configured.
    no_trust: bool,
}

impl Default for Identifier {
    /// Nothing configured: no Grafana trust, no users, no tokens.
    fn default() -> Self {
        Identifier::new(&IdentityConfig::default())
    }
}

// Header names as values, not strings: a lookup by string validates and
// lower-cases the name first, on every request.
const GRAFANA_USER: HeaderName = HeaderName::from_static("x-grafana-user");
const GRAFANA_ORG: HeaderName = HeaderName::from_static("x-grafana-org-id");
const DASHBOARD_UID: HeaderName = HeaderName::from_static("x-dashboard-uid");
const PANEL_ID: HeaderName = HeaderName::from_static("x-panel-id");
const DATASOURCE_UID: HeaderName = HeaderName::from_static("x-datasource-uid");

/// How promguard can know who is asking. Feeds the start-up log and `/-/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMode {
    /// `identity.grafana` is configured: requests that prove they came through the
    /// trusted Grafana are believed, and its `X-Grafana-User` names the person.
    Grafana,
    /// Nothing can prove a request came through Grafana: callers are known by
    /// credentials or by address, and Grafana's users cannot be told apart.
    Unverified,
}

impl IdentityMode {
    /// The value shown in the start-up log and `/-/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityMode::Grafana => "grafana",
            IdentityMode::Unverified => "unverified",
        }
    }

    /// One sentence for operators.
    pub fn describe(self) -> &'static str {
        match self {
            IdentityMode::Grafana => {
                "requests proven to come through the trusted Grafana (identity.grafana) are \
                 believed; X-Grafana-User names the person when Grafana sends it \
                 ([dataproxy] send_user_header = true)"
            }
            IdentityMode::Unverified => {
                "identity.grafana is not configured: Grafana's users cannot be told apart, \
                 X-Grafana-User is ignored, dashboard headers are believed for priority, and \
                 limits.unverified decides the per-user budgets of requests from Grafana"
            }
        }
    }
}

/// The outcome of [`Identifier::identify`]: the caller, and whether an untrusted
/// `X-Grafana-User` header was ignored.
#[derive(Debug)]
pub struct Identified {
    /// Who is asking.
    pub caller: Caller,
    /// A request without proof sent `X-Grafana-User`, which was ignored; the pipeline
    /// counts it in `promguard_identity_untrusted_user_header_total`.
    pub ignored_user_header: bool,
}

impl Identifier {
    /// Prepare the configured credentials. Header names were checked by config validation.
    pub fn new(config: &IdentityConfig) -> Self {
        let grafana = config.grafana.as_ref();
        Identifier {
            grafana_header: grafana.and_then(|g| {
                let name = HeaderName::from_bytes(g.secret_header.as_ref()?.as_bytes()).ok()?;
                Some((name, g.secret.as_ref()?.0.clone().into_bytes()))
            }),
            grafana_basic: grafana.and_then(|g| {
                g.basic_auth
                    .as_ref()
                    .map(|b| (b.username.clone(), b.password.0.clone().into_bytes()))
            }),
            users: config
                .users
                .iter()
                .map(|(name, pw)| (name.clone(), pw.0.clone().into_bytes()))
                .collect(),
            tokens: config
                .bearer_tokens
                .iter()
                .map(|(user, token)| (token.0.clone().into_bytes(), Arc::from(user.as_str())))
                .collect(),
            warned_untrusted: AtomicBool::new(false),
            warned_unproven: AtomicBool::new(false),
            warned_no_user_header: AtomicBool::new(false),
            no_trust: grafana.is_none(),
        }
    }

    /// The identity mode in force, for the start-up log and `/-/status`.
    pub fn mode(&self) -> IdentityMode {
        if self.no_trust {
            IdentityMode::Unverified
        } else {
            IdentityMode::Grafana
        }
    }

    /// Establish who sent a request.
    ///
    /// # Errors
    ///
    /// [`IdentityError`] when the request presents credentials that do not match:
    /// a wrong password is refused rather than silently treated as anonymous.
    pub fn identify(
        &self,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> Result<Identified, IdentityError> {
        let text = |name: &HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let credentials = match headers.get(header::AUTHORIZATION) {
            None => None,
            Some(value) => Some(parse_authorization(value.as_bytes())?),
        };
        let basic = match &credentials {
            Some(Credentials::Basic(user, password)) => Some((user.clone(), password.clone())),
            _ => None,
        };
        let bearer = match &credentials {
            Some(Credentials::Bearer(token)) => Some(token.as_str()),
            _ => None,
        };

        let via_grafana = self.grafana_header.as_ref().is_some_and(|(name, secret)| {
            headers
                .get(name)
                .is_some_and(|v| bool::from(v.as_bytes().ct_eq(secret)))
        }) || matches!((&self.grafana_basic, &basic), (Some((u, p)), Some((bu, bp)))
            if u == bu && bool::from(bp.as_bytes().ct_eq(p)));

        let org = text(&GRAFANA_ORG);
        let from_grafana = org.is_some()
            || text(&DATASOURCE_UID).is_some()
            || text(&header::USER_AGENT).is_some_and(|ua| ua.starts_with("Grafana/"));
        let grafana_user = text(&GRAFANA_USER);
        let mut ignored_user_header = false;
        let (user, source): (Arc<str>, Source) = if via_grafana {
            match &grafana_user {
                Some(login) => (Arc::from(login.as_str()), Source::GrafanaUser),
                None => (Arc::from("grafana"), Source::Grafana),
            }
        } else {
            if grafana_user.is_some() {
                ignored_user_header = true;
                if !self.warned_untrusted.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        %client,
                        "ignoring X-Grafana-User from a request that does not prove it came \
                         through the trusted Grafana (configure identity.grafana); \
                         further occurrences are only counted in \
                         promguard_identity_untrusted_user_header_total"
                    );
                }
            }
            if let Some((name, password)) = &basic {
                let known = self
                    .users
                    .get(name)
                    .is_some_and(|pw| bool::from(password.as_bytes().ct_eq(pw)));
                if !known {
                    return Err(IdentityError::BadCredentials);
                }
                (Arc::from(name.as_str()), Source::BasicAuth)
            } else if let Some(token) = bearer {
                let user = self
                    .tokens
                    .iter()
                    .find(|(t, _)| bool::from(token.as_bytes().ct_eq(t)))
                    .map(|(_, user)| user.clone())
                    .ok_or(IdentityError::UnknownToken)?;
                (user, Source::Bearer)
            } else {
                if from_grafana && !self.warned_unproven.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        %client,
                        "requests from a Grafana carry no proof that they came through your \
                         Grafana, so promguard cannot tell its users apart: set identity.grafana \
                         (a secret header on the data source) and [dataproxy] send_user_header = \
                         true in grafana.ini; until then limits.unverified decides their \
                         per-user budgets"
                    );
                }
                (Arc::from(format!("anonymous@{client}")), Source::Anonymous)
            }
        };
        if source == Source::Grafana && !self.warned_no_user_header.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                %client,
                "the trusted Grafana sends no X-Grafana-User, so all of its users look alike: \
                 set [dataproxy] send_user_header = true in grafana.ini; until then \
                 limits.unverified decides their per-user budgets"
            );
        }
        Ok(Identified {
            caller: Caller {
                user,
                source,
                client,
                org,
                dashboard: text(&DASHBOARD_UID),
                panel: text(&PANEL_ID),
                from_grafana,
            },
            ignored_user_header,
        })
    }
}

/// What an `Authorization` header presents.
enum Credentials {
    Basic(String, String),
    Bearer(String),
}

/// Read an `Authorization` header. Scheme names are case-insensitive (RFC 9110);
/// anything that is not well-formed Basic or Bearer credentials is refused, since a
/// header promguard cannot verify must never turn into an anonymous caller.
fn parse_authorization(value: &[u8]) -> Result<Credentials, IdentityError> {
    let text = std::str::from_utf8(value).map_err(|_| IdentityError::Malformed)?;
    let (scheme, rest) = text
        .trim()
        .split_once(' ')
        .ok_or(IdentityError::Malformed)?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| IdentityError::Malformed)?;
        let text = String::from_utf8(decoded).map_err(|_| IdentityError::Malformed)?;
        let (user, password) = text.split_once(':').ok_or(IdentityError::Malformed)?;
        Ok(Credentials::Basic(user.to_string(), password.to_string()))
    } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        Ok(Credentials::Bearer(rest.to_string()))
    } else {
        Err(IdentityError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BasicAuth, GrafanaTrust, Secret};

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7));

    fn identifier() -> Identifier {
        let config = IdentityConfig {
            grafana: Some(GrafanaTrust {
                secret_header: Some("X-Promguard-Secret".into()),
                secret: Some(Secret("s3cret".into())),
                basic_auth: Some(BasicAuth {
                    username: "grafana".into(),
                    password: Secret("gpass".into()),
                }),
            }),
            users: [("alice".to_string(), Secret("apass".into()))].into(),
            bearer_tokens: [("alerting".to_string(), Secret("tok-123".into()))].into(),
        };
        Identifier::new(&config)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn basic(user: &str, pw: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
        )
    }

    fn who(pairs: &[(&'static str, &str)]) -> Result<Identified, IdentityError> {
        identifier().identify(&headers(pairs), CLIENT)
    }

    #[test]
    fn grafana_user_is_believed_only_with_proof() {
        let trusted = who(&[
            ("x-grafana-user", "bob"),
            ("x-promguard-secret", "s3cret"),
            ("x-dashboard-uid", "orders"),
            ("x-panel-id", "4"),
            ("x-grafana-org-id", "1"),
        ])
        .unwrap();
        assert_eq!(&*trusted.caller.user, "bob");
        assert_eq!(trusted.caller.source, Source::GrafanaUser);
        assert_eq!(trusted.caller.dashboard.as_deref(), Some("orders"));
        assert_eq!(trusted.caller.panel.as_deref(), Some("4"));
        assert_eq!(trusted.caller.org.as_deref(), Some("1"));
        assert!(!trusted.ignored_user_header);

        let via_basic = who(&[
            ("x-grafana-user", "bob"),
            ("authorization", &basic("grafana", "gpass")),
        ])
        .unwrap();
        assert_eq!(&*via_basic.caller.user, "bob");

        let spoofed = who(&[("x-grafana-user", "bob"), ("x-promguard-secret", "guess")]).unwrap();
        assert_eq!(&*spoofed.caller.user, "anonymous@10.0.0.7");
        assert_eq!(spoofed.caller.source, Source::Anonymous);
        assert!(spoofed.ignored_user_header);
    }

    #[test]
    fn grafana_without_user_header_is_one_shared_identity() {
        let id = who(&[("x-promguard-secret", "s3cret")]).unwrap();
        assert_eq!(&*id.caller.user, "grafana");
        assert_eq!(id.caller.source, Source::Grafana);
    }

    #[test]
    fn basic_and_bearer_users() {
        let alice = who(&[("authorization", &basic("alice", "apass"))]).unwrap();
        assert_eq!(&*alice.caller.user, "alice");
        assert_eq!(alice.caller.source, Source::BasicAuth);
        assert_eq!(
            who(&[("authorization", &basic("alice", "wrong"))]).unwrap_err(),
            IdentityError::BadCredentials
        );
        assert_eq!(
            who(&[("authorization", &basic("mallory", "x"))]).unwrap_err(),
            IdentityError::BadCredentials
        );
        let bot = who(&[("authorization", "Bearer tok-123")]).unwrap();
        assert_eq!(&*bot.caller.user, "alerting");
        assert_eq!(bot.caller.source, Source::Bearer);
        assert_eq!(
            who(&[("authorization", "Bearer nope")]).unwrap_err(),
            IdentityError::UnknownToken
        );
    }

    #[test]
    fn credentials_that_cannot_be_verified_are_refused_never_anonymous() {
        for value in [
            "Basic !!!notbase64!!!".to_string(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("justauser")
            ),
            "Digest username=alice".to_string(),
            "Bearer".to_string(),
            "Bearer ".to_string(),
            "garbage".to_string(),
            String::new(),
        ] {
            let result = who(&[("authorization", value.as_str())]);
            assert!(result.is_err(), "{value:?} was accepted: {result:?}");
        }
        assert_eq!(
            who(&[("authorization", &basic("alice", "wrong"))]).unwrap_err(),
            IdentityError::BadCredentials
        );
        // Scheme names are case-insensitive.
        let lower = basic("alice", "apass").replacen("Basic", "basic", 1);
        assert_eq!(
            &*who(&[("authorization", &lower)]).unwrap().caller.user,
            "alice"
        );
        let upper = basic("alice", "apass").replacen("Basic", "BASIC", 1);
        assert_eq!(
            &*who(&[("authorization", &upper)]).unwrap().caller.user,
            "alice"
        );
        assert_eq!(
            &*who(&[("authorization", "bearer tok-123")])
                .unwrap()
                .caller
                .user,
            "alerting"
        );
        // With nothing configured, credentials still cannot be verified.
        let unconfigured = Identifier::default();
        let mut h = HeaderMap::new();
        h.insert("authorization", basic("alice", "apass").parse().unwrap());
        assert_eq!(
            unconfigured.identify(&h, CLIENT).unwrap_err(),
            IdentityError::BadCredentials
        );
    }

    #[test]
    fn grafana_requests_are_recognised_and_tell_whether_they_are_one_person() {
        let plain = who(&[]).unwrap().caller;
        assert!(!plain.from_grafana);
        assert!(plain.is_one_person(), "a plain client at one address");
        let default_grafana = who(&[
            ("user-agent", "Grafana/11.3.0"),
            ("x-grafana-org-id", "1"),
            ("x-dashboard-uid", "orders"),
        ])
        .unwrap()
        .caller;
        assert!(default_grafana.from_grafana);
        assert!(
            !default_grafana.is_one_person(),
            "everyone behind that Grafana"
        );
        let proven_without_user = who(&[("x-promguard-secret", "s3cret")]).unwrap().caller;
        assert!(!proven_without_user.is_one_person());
        let proven_user = who(&[
            ("x-promguard-secret", "s3cret"),
            ("x-grafana-user", "bob"),
            ("user-agent", "Grafana/11.3.0"),
        ])
        .unwrap()
        .caller;
        assert!(proven_user.is_one_person());
        assert_eq!(identifier().mode(), IdentityMode::Grafana);
        assert_eq!(Identifier::default().mode(), IdentityMode::Unverified);
    }

    #[test]
    fn without_configuration_everyone_is_anonymous_by_address() {
        let id = Identifier::default()
            .identify(&headers(&[("x-grafana-user", "root")]), CLIENT)
            .unwrap();
        assert_eq!(&*id.caller.user, "anonymous@10.0.0.7");
    }
}
