//! Effective export settings: `[audit]` over the standard `OTEL_*` environment over the
//! defaults (`audit.md` §6).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{AuditConfig, AuditExporter, AuditProtocol, audit_defaults};

/// Wire protocol of the OTLP exporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportProtocol {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    HttpProtobuf,
}

/// The resolved `[audit]` settings of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// False when the exporter is `none`: no provider is built.
    pub enabled: bool,
    /// gRPC or HTTP/protobuf.
    pub protocol: ExportProtocol,
    /// Full endpoint (for HTTP, the URL records are POSTed to).
    pub endpoint: String,
    /// Extra request headers / gRPC metadata (secrets: never logged).
    pub headers: BTreeMap<String, String>,
    /// Per-export timeout.
    pub timeout: Duration,
    /// PEM file of extra trust anchors for `https://` endpoints.
    pub ca_file: Option<PathBuf>,
    /// Records in flight at most (queued or being exported).
    pub max_queue_size: usize,
    /// Records per export request at most.
    pub max_export_batch_size: usize,
    /// Delay between two scheduled exports.
    pub scheduled_delay: Duration,
    /// Bound on the flush at shutdown.
    pub shutdown_timeout: Duration,
    /// Whether connection spans are exported as well.
    pub traces: bool,
    /// Resource attributes from `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SERVICE_NAME` and
    /// `audit.resource`, in that precedence (last wins).
    pub resource: BTreeMap<String, String>,
}

fn var(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name).filter(|v| !v.trim().is_empty())
}

fn first_var(env: &dyn Fn(&str) -> Option<String>, names: &[&str]) -> Option<(String, String)> {
    names
        .iter()
        .find_map(|n| var(env, n).map(|v| ((*n).to_string(), v)))
}

fn err(key: &str, problem: impl std::fmt::Display) -> String {
    format!("config error: {key}: {problem}")
}

fn parse_protocol(key: &str, v: &str) -> Result<ExportProtocol, String> {
    match v.trim() {
        "grpc" => Ok(ExportProtocol::Grpc),
        "http/protobuf" => Ok(ExportProtocol::HttpProtobuf),
        "http/json" => Err(err(key, "http/json is not supported")),
        other => Err(err(
            key,
            format!("expected \"grpc\" or \"http/protobuf\", found \"{other}\""),
        )),
    }
}

fn parse_ms(key: &str, v: &str, min: u64) -> Result<u64, String> {
    match v.trim().parse::<u64>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(err(
            key,
            format!(
                "expected an integer of at least {min}, found \"{}\"",
                v.trim()
            ),
        )),
    }
}

/// Checks that an endpoint is an absolute `http://` or `https://` URL with a host.
pub fn check_endpoint(key: &str, v: &str) -> Result<(), String> {
    let uri: http::Uri = v
        .parse()
        .map_err(|e| err(key, format!("invalid endpoint \"{v}\": {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(err(
                key,
                format!("invalid endpoint \"{v}\": expected an http:// or https:// URL"),
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(err(key, format!("invalid endpoint \"{v}\": no host")));
    }
    Ok(())
}

/// Percent-decodes a W3C-baggage-style value (`%20` etc.); malformed escapes are an error.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses `k1=v1,k2=v2` (values percent-encoded), the format of `OTEL_RESOURCE_ATTRIBUTES`
/// and `OTEL_EXPORTER_OTLP_HEADERS`.
pub fn parse_key_values(key: &str, v: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (i, item) in v.split(',').enumerate() {
        if item.trim().is_empty() {
            continue;
        }
        let Some((k, val)) = item.split_once('=') else {
            return Err(err(key, format!("item {} is not KEY=VALUE", i + 1)));
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(err(key, format!("item {} has an empty key", i + 1)));
        }
        let Some(val) = percent_decode(val.trim()) else {
            return Err(err(
                key,
                format!("item {} has a malformed percent-encoding", i + 1),
            ));
        };
        out.insert(k.to_string(), val);
    }
    Ok(out)
}

impl AuditSettings {
    /// Resolves the settings from the file's `[audit]` and the process environment.
    pub fn from_env(cfg: &AuditConfig) -> Result<AuditSettings, String> {
        AuditSettings::resolve(cfg, &|name| std::env::var(name).ok())
    }

    /// Resolves the settings from `[audit]` and an environment lookup (`audit.md` §6): the
    /// file wins over the environment, a signal-specific variable over the generic one.
    /// Errors are one line naming the key or variable (the caller exits 2).
    pub fn resolve(
        cfg: &AuditConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<AuditSettings, String> {
        let protocol = match cfg.protocol {
            Some(AuditProtocol::Grpc) => ExportProtocol::Grpc,
            Some(AuditProtocol::HttpProtobuf) => ExportProtocol::HttpProtobuf,
            None => match first_var(
                env,
                &[
                    "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL",
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                ],
            ) {
                Some((k, v)) => parse_protocol(&k, &v)?,
                None => ExportProtocol::Grpc,
            },
        };
        let logs_endpoint = var(env, "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT");
        let generic_endpoint = var(env, "OTEL_EXPORTER_OTLP_ENDPOINT");
        let endpoint_known =
            cfg.endpoint.is_some() || logs_endpoint.is_some() || generic_endpoint.is_some();
        let endpoint = if let Some(e) = &cfg.endpoint {
            check_endpoint("audit.endpoint", e)?;
            e.clone()
        } else if let Some(e) = logs_endpoint {
            check_endpoint("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", &e)?;
            e.trim().to_string()
        } else if let Some(e) = generic_endpoint {
            check_endpoint("OTEL_EXPORTER_OTLP_ENDPOINT", &e)?;
            let e = e.trim();
            match protocol {
                ExportProtocol::Grpc => e.to_string(),
                ExportProtocol::HttpProtobuf => format!("{}/v1/logs", e.trim_end_matches('/')),
            }
        } else {
            match protocol {
                ExportProtocol::Grpc => audit_defaults::GRPC_ENDPOINT.to_string(),
                ExportProtocol::HttpProtobuf => audit_defaults::HTTP_ENDPOINT.to_string(),
            }
        };
        let enabled = match cfg.exporter {
            Some(AuditExporter::Otlp) => true,
            Some(AuditExporter::None) => false,
            None => match var(env, "OTEL_LOGS_EXPORTER") {
                Some(v) => match v.trim() {
                    "otlp" => true,
                    "none" => false,
                    other => {
                        return Err(err(
                            "OTEL_LOGS_EXPORTER",
                            format!("expected \"otlp\" or \"none\", found \"{other}\""),
                        ));
                    }
                },
                None => endpoint_known,
            },
        };
        let mut headers = match first_var(
            env,
            &[
                "OTEL_EXPORTER_OTLP_LOGS_HEADERS",
                "OTEL_EXPORTER_OTLP_HEADERS",
            ],
        ) {
            Some((k, v)) => parse_key_values(&k, &v)?,
            None => BTreeMap::new(),
        };
        headers.extend(cfg.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        let timeout_ms = match cfg.timeout_ms {
            Some(t) => t,
            None => match first_var(
                env,
                &[
                    "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT",
                    "OTEL_EXPORTER_OTLP_TIMEOUT",
                ],
            ) {
                Some((k, v)) => parse_ms(&k, &v, 1)?,
                None => audit_defaults::TIMEOUT_MS,
            },
        };
        let ca_file = cfg.ca_file.clone().or_else(|| {
            var(env, "OTEL_EXPORTER_OTLP_CERTIFICATE").map(|v| PathBuf::from(v.trim()))
        });
        let from = |cfg_value: Option<u64>, name: &str, default: u64| -> Result<u64, String> {
            match cfg_value {
                Some(v) => Ok(v),
                None => match var(env, name) {
                    Some(v) => parse_ms(name, &v, 1),
                    None => Ok(default),
                },
            }
        };
        let max_queue_size = from(
            cfg.max_queue_size,
            "OTEL_BLRP_MAX_QUEUE_SIZE",
            audit_defaults::MAX_QUEUE_SIZE,
        )?;
        let max_export_batch_size = from(
            cfg.max_export_batch_size,
            "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE",
            audit_defaults::MAX_EXPORT_BATCH_SIZE,
        )?
        .min(max_queue_size);
        let scheduled_delay_ms = from(
            cfg.scheduled_delay_ms,
            "OTEL_BLRP_SCHEDULE_DELAY",
            audit_defaults::SCHEDULED_DELAY_MS,
        )?;
        let traces = match cfg.traces {
            Some(t) => t,
            None => var(env, "OTEL_TRACES_EXPORTER")
                .is_some_and(|v| v.split(',').any(|x| x.trim() == "otlp")),
        };
        let mut resource = match var(env, "OTEL_RESOURCE_ATTRIBUTES") {
            Some(v) => parse_key_values("OTEL_RESOURCE_ATTRIBUTES", &v)?,
            None => BTreeMap::new(),
        };
        if let Some(name) = var(env, "OTEL_SERVICE_NAME") {
            resource.insert("service.name".to_string(), name.trim().to_string());
        }
        resource.extend(cfg.resource.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(AuditSettings {
            enabled,
            protocol,
            endpoint,
            headers,
            timeout: Duration::from_millis(timeout_ms),
            ca_file,
            max_queue_size: usize::try_from(max_queue_size).unwrap_or(usize::MAX),
            max_export_batch_size: usize::try_from(max_export_batch_size).unwrap_or(usize::MAX),
            scheduled_delay: Duration::from_millis(scheduled_delay_ms),
            shutdown_timeout: Duration::from_millis(cfg.shutdown_timeout_ms),
            traces,
            resource,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(cfg: &AuditConfig, vars: &[(&str, &str)]) -> Result<AuditSettings, String> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        AuditSettings::resolve(cfg, &move |n| vars.get(n).cloned())
    }

    #[test]
    fn defaults_are_off_and_grpc() {
        let s = resolve(&AuditConfig::default(), &[]).unwrap();
        assert!(!s.enabled);
        assert_eq!(s.protocol, ExportProtocol::Grpc);
        assert_eq!(s.endpoint, "http://localhost:4317");
        assert_eq!(s.max_queue_size, 2048);
        assert_eq!(s.max_export_batch_size, 512);
        assert_eq!(s.timeout, Duration::from_millis(10000));
        assert_eq!(s.shutdown_timeout, Duration::from_millis(5000));
        assert!(!s.traces);
    }

    #[test]
    fn generic_http_endpoint_gets_v1_logs_and_enables() {
        let s = resolve(
            &AuditConfig::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9/"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ],
        )
        .unwrap();
        assert!(s.enabled);
        assert_eq!(s.endpoint, "http://127.0.0.1:9/v1/logs");
        let s = resolve(
            &AuditConfig::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9/"),
                ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://127.0.0.1:8/x"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ],
        )
        .unwrap();
        assert_eq!(s.endpoint, "http://127.0.0.1:8/x");
    }

    #[test]
    fn config_wins_over_environment() {
        let cfg = AuditConfig {
            protocol: Some(AuditProtocol::Grpc),
            endpoint: Some("http://127.0.0.1:1".into()),
            max_queue_size: Some(8),
            exporter: Some(AuditExporter::None),
            resource: [("user.id".to_string(), "file".to_string())].into(),
            ..AuditConfig::default()
        };
        let s = resolve(
            &cfg,
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:2"),
                ("OTEL_BLRP_MAX_QUEUE_SIZE", "100"),
                ("OTEL_LOGS_EXPORTER", "otlp"),
                ("OTEL_RESOURCE_ATTRIBUTES", "user.id=env,team=a%20b"),
                ("OTEL_SERVICE_NAME", "svc"),
            ],
        )
        .unwrap();
        assert!(!s.enabled);
        assert_eq!(s.protocol, ExportProtocol::Grpc);
        assert_eq!(s.endpoint, "http://127.0.0.1:1");
        assert_eq!(s.max_queue_size, 8);
        assert_eq!(s.max_export_batch_size, 8);
        assert_eq!(s.resource["user.id"], "file");
        assert_eq!(s.resource["team"], "a b");
        assert_eq!(s.resource["service.name"], "svc");
    }

    #[test]
    fn bad_variables_name_the_variable() {
        let e = resolve(
            &AuditConfig::default(),
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
        )
        .unwrap_err();
        assert!(e.contains("OTEL_EXPORTER_OTLP_PROTOCOL: http/json"), "{e}");
        let e = resolve(
            &AuditConfig::default(),
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")],
        )
        .unwrap_err();
        assert!(e.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{e}");
        let e = resolve(
            &AuditConfig::default(),
            &[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")],
        )
        .unwrap_err();
        assert!(e.contains("OTEL_EXPORTER_OTLP_HEADERS"), "{e}");
        let e = resolve(
            &AuditConfig::default(),
            &[("OTEL_BLRP_SCHEDULE_DELAY", "x")],
        )
        .unwrap_err();
        assert!(e.contains("OTEL_BLRP_SCHEDULE_DELAY"), "{e}");
    }
}
