//! Turns the three accepted request bodies into a module reference and a spec.
//!
//! - `application/wasm`: the module bytes; args, env and limits in the query
//!   (`?arg=a&arg=b&env=K%3DV&timeout_ms=…&max_memory_bytes=…&fuel=…&log_level=…`,
//!   `allowed_host=https://api.example.com` repeated; `max_memory_mb` is
//!   accepted too; `queue_timeout_ms`, `idempotency_key`; `retry_max_attempts`,
//!   `retry_backoff_ms`, `retry_max_backoff_ms`, `retry_on` repeated).
//! - `application/json`: `{"module":"sha256:…"` or `"module_base64":"…"`, `"args"`,
//!   `"env"`, `"stdin"` or `"stdin_base64"`, `"input"` (any JSON value) or
//!   `"input_base64"`, `"limits"`, `"log_level"`, `"allowed_hosts"`,
//!   `"queue_timeout_ms"`, `"idempotency_key"`, `"retry"`: {`"max_attempts"`,
//!   `"backoff_ms"`, `"max_backoff_ms"`, `"on"`}}.
//! - Any of them: an `Idempotency-Key` header (the same as `idempotency_key`).
//! - `multipart/form-data`: a `module` file part and an optional `spec` JSON part.

use std::collections::BTreeMap;

use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header;
use base64::Engine as _;
use serde::Deserialize;

use super::ApiError;
use crate::outbound::parse_rules;
use crate::retry::RetryRequest;
use crate::service::{ModuleRef, Submission};
use crate::workload::{Limits, LogLevel, Stdin, WorkloadSpec};

/// The JSON spec (also the `spec` part of a multipart upload).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSpec {
    module: Option<String>,
    module_base64: Option<String>,
    argv0: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    stdin: Option<String>,
    stdin_base64: Option<String>,
    input: Option<serde_json::Value>,
    input_base64: Option<String>,
    #[serde(default)]
    limits: JsonLimits,
    log_level: Option<LogLevel>,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    /// Fail it `queue_timeout` if it has not started after this long.
    queue_timeout_ms: Option<u64>,
    /// A repeat with this key within 24 h answers the first's workload.
    idempotency_key: Option<String>,
    /// When failed attempts run again.
    retry: Option<RetryRequest>,
}

/// Limits as the API spells them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonLimits {
    timeout_ms: Option<u64>,
    max_memory_bytes: Option<u64>,
    max_memory_mb: Option<u64>,
    fuel: Option<u64>,
    max_output_bytes: Option<u64>,
}

impl JsonLimits {
    fn into_limits(self) -> Result<Limits, ApiError> {
        if self.timeout_ms == Some(0) {
            return Err(ApiError::BadRequest(
                "limits.timeout_ms must be greater than 0".into(),
            ));
        }
        let from_mb = self
            .max_memory_mb
            .map(|mb| {
                mb.checked_mul(1 << 20)
                    .ok_or_else(|| ApiError::BadRequest("limits.max_memory_mb is too large".into()))
            })
            .transpose()?;
        let max_memory_bytes = match (self.max_memory_bytes, from_mb) {
            (Some(_), Some(_)) => {
                return Err(ApiError::BadRequest(
                    "give limits.max_memory_bytes or limits.max_memory_mb, not both".into(),
                ));
            }
            (bytes, mb) => bytes.or(mb),
        };
        Ok(Limits {
            timeout_ms: self.timeout_ms,
            max_memory_bytes,
            fuel: self.fuel,
            max_output_bytes: self.max_output_bytes,
        })
    }
}

fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| ApiError::BadRequest(format!("`{field}` is not valid base64: {e}")))
}

/// Refuses what a guest could not be given faithfully: a NUL cannot pass
/// through WASI's C-string args and environment, and `KEY=VALUE` pairs need a
/// non-empty key without `=`.
fn check_args_and_env(args: &[String], env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if let Some(i) = args.iter().position(|a| a.contains('\0')) {
        return Err(ApiError::BadRequest(format!(
            "argument {i} contains a NUL character, which a WASI argument cannot hold"
        )));
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ApiError::BadRequest(format!(
                "environment key `{}` is not allowed: it must be non-empty, without `=` or NUL",
                k.escape_debug()
            )));
        }
        if v.contains('\0') {
            return Err(ApiError::BadRequest(format!(
                "the value of environment variable `{k}` contains a NUL character"
            )));
        }
    }
    Ok(())
}

impl JsonSpec {
    /// Builds the submission; `uploaded` is the module from a multipart part;
    /// args, env, stdin and input together may be at most `max_spec` bytes.
    pub(super) fn into_submission(
        self,
        uploaded: Option<bytes::Bytes>,
        max_spec: usize,
    ) -> Result<Submission, ApiError> {
        check_args_and_env(&self.args, &self.env)?;
        let allowed_hosts = parse_rules(&self.allowed_hosts)
            .map_err(|e| ApiError::BadRequest(format!("allowed_hosts: {e}")))?;
        if let Some(argv0) = &self.argv0 {
            check_args_and_env(std::slice::from_ref(argv0), &BTreeMap::new())?;
        }
        let module = match (uploaded, self.module, self.module_base64) {
            (Some(bytes), None, None) => ModuleRef::Bytes(bytes),
            (None, Some(hash), None) => ModuleRef::Hash(parse_hash(&hash)?),
            (None, None, Some(b64)) => {
                ModuleRef::Bytes(decode_base64("module_base64", &b64)?.into())
            }
            (None, None, None) => {
                return Err(ApiError::BadRequest(
                    "no module: give `module` (a sha256 hash) or `module_base64`".into(),
                ));
            }
            _ => {
                return Err(ApiError::BadRequest(
                    "give exactly one module: `module`, `module_base64` or a module part".into(),
                ));
            }
        };
        let stdin = match (self.stdin, self.stdin_base64) {
            (None, None) => Stdin::Empty,
            (Some(text), None) => Stdin::Bytes(text.into_bytes()),
            (None, Some(b64)) => Stdin::Bytes(decode_base64("stdin_base64", &b64)?),
            (Some(_), Some(_)) => {
                return Err(ApiError::BadRequest(
                    "give `stdin` or `stdin_base64`, not both".into(),
                ));
            }
        };
        let input = match (self.input, self.input_base64) {
            (None, None) => None,
            // The JSON text of the value: what the SDK's `Json<T>` parses.
            (Some(value), None) => Some(value.to_string().into_bytes()),
            (None, Some(b64)) => Some(decode_base64("input_base64", &b64)?),
            (Some(_), Some(_)) => {
                return Err(ApiError::BadRequest(
                    "give `input` or `input_base64`, not both".into(),
                ));
            }
        };
        let mut args = vec![self.argv0.unwrap_or_else(|| "workload.wasm".into())];
        args.extend(self.args);
        let stdin_len = match &stdin {
            Stdin::Bytes(b) => b.len(),
            _ => 0,
        };
        let size = args.iter().map(|a| a.len() + 1).sum::<usize>()
            + self
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>()
            + stdin_len
            + input.as_ref().map_or(0, Vec::len)
            + self.allowed_hosts.iter().map(String::len).sum::<usize>();
        if size > max_spec {
            return Err(ApiError::PayloadTooLarge(format!(
                "args, env, stdin, input and allowed_hosts come to {size} bytes; this server \
                 accepts at most {max_spec} (--max-spec-size)"
            )));
        }
        if self.queue_timeout_ms == Some(0) {
            return Err(ApiError::BadRequest(
                "queue_timeout_ms must be greater than 0".into(),
            ));
        }
        if let Some(key) = &self.idempotency_key {
            crate::service::check_idempotency_key(key)?;
        }
        let retry = (self.retry.map(RetryRequest::check))
            .transpose()
            .map_err(ApiError::BadRequest)?;
        Ok(Submission {
            module,
            queue_timeout_ms: self.queue_timeout_ms,
            idempotency_key: self.idempotency_key,
            spec: WorkloadSpec {
                args,
                env: self.env.into_iter().collect(),
                stdin,
                preopens: Vec::new(),
                limits: self.limits.into_limits()?,
                input,
                log_level: self.log_level,
                allowed_hosts,
                tenant: None,
                schedule: None,
                retry,
            },
        })
    }
}

/// Checks a `sha256:<64 hex>` module reference.
pub fn parse_hash(hash: &str) -> Result<String, ApiError> {
    let hex = hash.strip_prefix("sha256:").unwrap_or("");
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(format!("sha256:{}", hex.to_ascii_lowercase()))
    } else {
        Err(ApiError::BadRequest(format!(
            "`{}` is not a module hash (expected sha256:<64 hex digits>)",
            hash.chars().take(80).collect::<String>()
        )))
    }
}

/// Reads a whole body, refusing more than `limit` bytes.
pub async fn read_body(req: Request, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let too_large = || ApiError::PayloadTooLarge(format!("the body is larger than {limit} bytes"));
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| body_error(e.into_inner(), too_large))
}

/// A body that failed while read: too large, or stalled past the server's timeout.
fn body_error(e: axum::BoxError, too_large: impl FnOnce() -> ApiError) -> ApiError {
    if stalled_body(&*e) {
        stalled()
    } else {
        too_large()
    }
}

/// True when `e`, or what caused it, is the body timeout firing.
fn stalled_body(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source())
        .any(|e| e.is::<tower_http::timeout::TimeoutError>())
}

/// The answer to a body that stopped arriving.
pub fn stalled() -> ApiError {
    ApiError::RequestTimeout(
        "the request body stopped arriving; send it without pauses (see --client-timeout)".into(),
    )
}

/// The request's media type, without parameters.
pub fn media_type(req: &Request) -> String {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Parses any of the three bodies; `limit` bounds the body, `max_spec` the
/// args, env, stdin and input.
pub async fn parse_submission(
    req: Request,
    limit: usize,
    max_spec: usize,
) -> Result<Submission, ApiError> {
    let header_key = match req.headers().get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::BadRequest("the Idempotency-Key header is not visible ASCII".into())
                })?
                .to_owned(),
        ),
        None => None,
    };
    let mut submission = parse_body(req, limit, max_spec).await?;
    match (header_key, &submission.idempotency_key) {
        (Some(h), Some(j)) if h != *j => {
            return Err(ApiError::BadRequest(
                "the Idempotency-Key header and the spec's idempotency_key differ".into(),
            ));
        }
        (Some(h), _) => {
            crate::service::check_idempotency_key(&h)?;
            submission.idempotency_key = Some(h);
        }
        _ => {}
    }
    Ok(submission)
}

/// [`parse_submission`]'s body.
async fn parse_body(req: Request, limit: usize, max_spec: usize) -> Result<Submission, ApiError> {
    match media_type(&req).as_str() {
        "application/wasm" => {
            let query = req.uri().query().unwrap_or("").to_owned();
            let spec = query_spec(&query)?;
            let bytes = read_body(req, limit).await?;
            spec.into_submission(Some(bytes), max_spec)
        }
        "application/json" => {
            let bytes = read_body(req, limit).await?;
            let spec: JsonSpec = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
            spec.into_submission(None, max_spec)
        }
        "multipart/form-data" => {
            let mut multipart = Multipart::from_request(req, &())
                .await
                .map_err(|e| ApiError::BadRequest(format!("bad multipart body: {e}")))?;
            let mut module = None;
            let mut spec = None;
            let twice = |part: &str| {
                ApiError::BadRequest(format!(
                    "the multipart body has more than one `{part}` part; send exactly one"
                ))
            };
            while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
                match field.name().unwrap_or("") {
                    "module" => {
                        if module.is_some() {
                            return Err(twice("module"));
                        }
                        module = Some(field.bytes().await.map_err(multipart_error)?)
                    }
                    "spec" => {
                        if spec.is_some() {
                            return Err(twice("spec"));
                        }
                        let bytes = field.bytes().await.map_err(multipart_error)?;
                        spec = Some(serde_json::from_slice::<JsonSpec>(&bytes).map_err(|e| {
                            ApiError::BadRequest(format!("malformed JSON in the spec part: {e}"))
                        })?);
                    }
                    other => {
                        return Err(ApiError::BadRequest(format!(
                            "unexpected multipart part `{other}` (expected `module` and `spec`)"
                        )));
                    }
                }
            }
            let Some(module) = module else {
                return Err(ApiError::BadRequest(
                    "the multipart body has no `module` part".into(),
                ));
            };
            spec.unwrap_or_default()
                .into_submission(Some(module), max_spec)
        }
        "" => Err(ApiError::UnsupportedMediaType(
            "missing Content-Type: use application/wasm, application/json or multipart/form-data"
                .into(),
        )),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "unsupported Content-Type `{other}`: use application/wasm, application/json or multipart/form-data"
        ))),
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if stalled_body(&e) {
        stalled()
    } else if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(format!("the body is too large: {}", e.body_text()))
    } else {
        ApiError::BadRequest(format!("bad multipart body: {}", e.body_text()))
    }
}

/// The spec of an `application/wasm` upload, from its query string.
fn query_spec(query: &str) -> Result<JsonSpec, ApiError> {
    let mut spec = JsonSpec::default();
    let number = |key: &str, value: &str| {
        value.parse::<u64>().map_err(|_| {
            ApiError::BadRequest(format!("`{key}` must be a whole number, got `{value}`"))
        })
    };
    // Repeated keys (`arg=a&arg=b`) are all kept, in order.
    for (key, value) in form_urlencoded::parse(query.as_bytes()).into_owned() {
        match key.as_str() {
            "arg" => spec.args.push(value),
            "allowed_host" => spec.allowed_hosts.push(value),
            "argv0" => spec.argv0 = Some(value),
            "env" => match value.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    spec.env.insert(k.to_owned(), v.to_owned());
                }
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "`env={value}` is not KEY=VALUE"
                    )));
                }
            },
            "stdin" => spec.stdin = Some(value),
            "input" => {
                let json = serde_json::from_str(&value).map_err(|e| {
                    ApiError::BadRequest(format!("`input` must be JSON ({e}); use `input_base64`"))
                })?;
                spec.input = Some(json);
            }
            "input_base64" => spec.input_base64 = Some(value),
            "timeout_ms" => spec.limits.timeout_ms = Some(number(&key, &value)?),
            "max_memory_bytes" => spec.limits.max_memory_bytes = Some(number(&key, &value)?),
            "max_memory_mb" => spec.limits.max_memory_mb = Some(number(&key, &value)?),
            "fuel" => spec.limits.fuel = Some(number(&key, &value)?),
            "log_level" => {
                let level = value.parse().map_err(|_| {
                    ApiError::BadRequest(format!(
                        "`log_level={value}` is not one of trace, debug, info, warn, error"
                    ))
                })?;
                spec.log_level = Some(level);
            }
            "max_output_bytes" => spec.limits.max_output_bytes = Some(number(&key, &value)?),
            "queue_timeout_ms" => spec.queue_timeout_ms = Some(number(&key, &value)?),
            "idempotency_key" => spec.idempotency_key = Some(value),
            "retry_max_attempts" | "retry_backoff_ms" | "retry_max_backoff_ms" => {
                let whole = value.parse::<i64>().map_err(|_| {
                    ApiError::BadRequest(format!("`{key}` must be a whole number, got `{value}`"))
                })?;
                let retry = spec.retry.get_or_insert_with(RetryRequest::default);
                match key.as_str() {
                    "retry_max_attempts" => retry.max_attempts = Some(whole),
                    "retry_backoff_ms" => retry.backoff_ms = Some(whole),
                    _ => retry.max_backoff_ms = Some(whole),
                }
            }
            // Repeated or comma-separated: `retry_on=exit&retry_on=trap`.
            "retry_on" => {
                let retry = spec.retry.get_or_insert_with(RetryRequest::default);
                let on = retry.on.get_or_insert_with(Vec::new);
                on.extend(value.split(',').map(str::trim).map(str::to_owned));
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter `{other}`"
                )));
            }
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streamed(len: usize) -> Request {
        // A stream body has no declared length, as with chunked encoding.
        let chunks = vec![Ok::<_, std::io::Error>(bytes::Bytes::from(vec![0u8; len]))];
        Request::new(axum::body::Body::from_stream(tokio_stream::iter(chunks)))
    }

    #[tokio::test]
    async fn an_undeclared_body_over_the_limit_is_refused_while_read() {
        let err = read_body(streamed(129), 128).await.unwrap_err();
        assert!(matches!(err, ApiError::PayloadTooLarge(_)), "{err:?}");
        assert_eq!(read_body(streamed(128), 128).await.unwrap().len(), 128);
    }
}
