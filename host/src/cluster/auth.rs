//! How a node proves itself: to NATS (user and password, token, creds file,
//! nkey, TLS with a CA and a client certificate), and to the other nodes
//! (control messages signed with the cluster's shared secret).
//!
//! Owns the secrets and keeps them out of every message: URLs are shown with
//! their credentials taken out, and no error or log line carries a password,
//! token or key. It must not decide what a node does with a message; it only
//! says whether the message came from a node of this cluster.

use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::{HeaderMap, ServerAddr};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Header carrying a control message's signature (hex HMAC-SHA256).
const SIGNATURE_HEADER: &str = "Vulcan-Signature";
/// Header carrying when a control message was signed (ms since the epoch).
const SIGNED_AT_HEADER: &str = "Vulcan-Signed-At";
/// A signed control message older (or newer) than this is refused, so a
/// captured one cannot be replayed later.
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(60);

/// A secret: printed as `***`, never as itself.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Everything a node may need to connect to NATS and to sign what it sends.
#[derive(Debug, Clone, Default)]
pub struct ClusterAuth {
    /// User name (from the URL, or `--cluster-user`).
    pub user: Option<String>,
    /// Password (from the URL, or `--cluster-password`).
    pub password: Option<Secret>,
    /// `--cluster-token`.
    pub token: Option<Secret>,
    /// `--cluster-creds`: a JWT and nkey seed, as `nsc` writes them.
    pub creds_file: Option<PathBuf>,
    /// `--cluster-nkey`: a file holding an nkey seed (`SU…`).
    pub nkey_file: Option<PathBuf>,
    /// `--cluster-ca`: the CA that signed the NATS server's certificate.
    pub ca_file: Option<PathBuf>,
    /// `--cluster-cert` and `--cluster-key`: this node's client certificate.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// `--cluster-secret`: signs and checks control messages between nodes.
    pub secret: Option<Secret>,
}

/// NATS server URLs with their credentials taken out.
#[derive(Debug, Clone)]
pub struct ServerUrls {
    addrs: Vec<ServerAddr>,
    /// Credentials found in the URLs.
    user: Option<String>,
    password: Option<Secret>,
    /// A token in the URLs (`nats://token@host`).
    token: Option<Secret>,
    /// Some URL said `tls://`.
    tls: bool,
}

impl ServerUrls {
    /// Parses comma-separated URLs; credentials in them (`nats://user:pass@host`)
    /// are taken out and must be the same in each. Errors never repeat a URL.
    pub fn parse(urls: &str) -> anyhow::Result<Self> {
        let mut parsed = ServerUrls {
            addrs: Vec::new(),
            user: None,
            password: None,
            token: None,
            tls: false,
        };
        for (i, url) in urls.split(',').map(str::trim).enumerate() {
            if url.is_empty() {
                continue;
            }
            let n = i + 1;
            let addr = ServerAddr::from_str(url)
                .map_err(|_| anyhow::anyhow!("--cluster URL #{n} is not a NATS URL"))?;
            let user = addr.username().map(percent_decode);
            let password = addr.password().map(percent_decode);
            if let (Some(token), None) = (&user, &password) {
                parsed.token = Some(Secret::new(token.clone()));
            } else if user.is_some() || password.is_some() {
                if parsed.user.is_some()
                    && (parsed.user != user
                        || parsed.password.as_ref().map(Secret::expose) != password.as_deref())
                {
                    anyhow::bail!("--cluster URLs name different users; give one user for all");
                }
                parsed.user = user;
                parsed.password = password.map(Secret::new);
            }
            parsed.tls |= addr.scheme() == "tls";
            parsed.addrs.push(
                ServerAddr::from_str(&bare(&addr))
                    .map_err(|_| anyhow::anyhow!("--cluster URL #{n} is not a NATS URL"))?,
            );
        }
        if parsed.addrs.is_empty() {
            anyhow::bail!("--cluster names no NATS URL");
        }
        Ok(parsed)
    }

    /// The URLs as they can be shown: no credentials.
    pub fn shown(&self) -> String {
        self.addrs.iter().map(bare).collect::<Vec<_>>().join(",")
    }

    /// The addresses to connect to.
    pub fn addrs(&self) -> Vec<ServerAddr> {
        self.addrs.clone()
    }
}

/// `scheme://host:port` of `addr`: no credentials, no path.
fn bare(addr: &ServerAddr) -> String {
    match addr.host().contains(':') {
        true => format!("{}://[{}]:{}", addr.scheme(), addr.host(), addr.port()),
        false => format!("{}://{}:{}", addr.scheme(), addr.host(), addr.port()),
    }
}

/// `%xx` escapes in a URL's user or password, decoded.
fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

impl ClusterAuth {
    /// Options that authenticate as this says (credentials in `urls` count
    /// as `--cluster-user`/`--cluster-password`, which win over them).
    pub async fn connect_options(
        &self,
        urls: &ServerUrls,
    ) -> anyhow::Result<async_nats::ConnectOptions> {
        let mut options = async_nats::ConnectOptions::new();
        let user = self.user.clone().or_else(|| urls.user.clone());
        let password = self.password.clone().or_else(|| urls.password.clone());
        match (user, password) {
            (Some(user), password) => {
                let password = password.map(|p| p.expose().to_owned()).unwrap_or_default();
                options = options.user_and_password(user, password);
            }
            (None, Some(_)) => anyhow::bail!("a NATS password was given without a user"),
            (None, None) => {}
        }
        if let Some(token) = self.token.as_ref().or(urls.token.as_ref()) {
            options = options.token(token.expose().to_owned());
        }
        if let Some(path) = &self.creds_file {
            // Read here, so that an error names the file and not its content.
            let creds = std::fs::read_to_string(path).with_context(|| {
                format!("failed to read the NATS creds file {}", path.display())
            })?;
            options = options.credentials(&creds).map_err(|_| {
                anyhow::anyhow!(
                    "{} is not a NATS creds file (a user JWT and an nkey seed)",
                    path.display()
                )
            })?;
        }
        if let Some(path) = &self.nkey_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("failed to read the NATS nkey file {}", path.display()))?;
            let seed = text
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with("SU"))
                .ok_or_else(|| {
                    anyhow::anyhow!("{} holds no user nkey seed (SU…)", path.display())
                })?;
            if nkeys::KeyPair::from_seed(seed).is_err() {
                anyhow::bail!("{} holds a malformed nkey seed", path.display());
            }
            options = options.nkey(seed.to_owned());
        }
        let mut tls = urls.tls;
        if let Some(ca) = &self.ca_file {
            check_readable(ca, "--cluster-ca")?;
            options = options.add_root_certificates(ca.clone());
            tls = true;
        }
        if let Some((cert, key)) = &self.client_cert {
            check_readable(cert, "--cluster-cert")?;
            check_readable(key, "--cluster-key")?;
            options = options.add_client_certificate(cert.clone(), key.clone());
            tls = true;
        }
        if tls {
            options = options.require_tls(true);
        }
        Ok(options)
    }

    /// The signer of control messages, when the cluster has a secret.
    pub fn signer(&self) -> Option<Signer> {
        self.secret.as_ref().map(|s| Signer {
            key: s.expose().as_bytes().to_vec(),
        })
    }
}

fn check_readable(path: &std::path::Path, flag: &str) -> anyhow::Result<()> {
    std::fs::metadata(path).with_context(|| format!("{flag} {} cannot be read", path.display()))?;
    Ok(())
}

/// Signs control messages with the cluster's secret, and checks them.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    fn mac(&self, subject: &str, signed_at: &str, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        // Lengths first, so no two (subject, time, payload) run together alike.
        for part in [subject.as_bytes(), signed_at.as_bytes(), payload] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// Headers that prove `payload` on `subject` comes from a node of this cluster.
    pub fn sign(&self, subject: &str, payload: &[u8]) -> HeaderMap {
        let signed_at = super::now_ms().to_string();
        let signature = hex::encode(
            self.mac(subject, &signed_at, payload)
                .finalize()
                .into_bytes(),
        );
        let mut headers = HeaderMap::new();
        headers.insert(SIGNED_AT_HEADER, signed_at.as_str());
        headers.insert(SIGNATURE_HEADER, signature.as_str());
        headers
    }

    /// Why a message on `subject` is not from a node of this cluster, or
    /// `None` when it is.
    pub fn refusal(
        &self,
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: &[u8],
    ) -> Option<&'static str> {
        let header = |name| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        let (Some(signed_at), Some(signature)) =
            (header(SIGNED_AT_HEADER), header(SIGNATURE_HEADER))
        else {
            return Some("it is not signed");
        };
        let Ok(signature) = hex::decode(signature) else {
            return Some("its signature is not hex");
        };
        // Constant-time comparison.
        if self
            .mac(subject, signed_at, payload)
            .verify_slice(&signature)
            .is_err()
        {
            return Some("its signature does not match this cluster's secret");
        }
        let Ok(at) = signed_at.parse::<u64>() else {
            return Some("its signing time is not a number");
        };
        let now = u64::try_from(super::now_ms()).unwrap_or(0);
        if now.abs_diff(at) > SIGNATURE_LIFETIME.as_millis() as u64 {
            return Some("it was signed too long ago");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_taken_out_of_urls_and_never_shown() {
        let urls = ServerUrls::parse(
            "nats://vulcan:s%40cret@127.0.0.1:4222, nats://vulcan:s%40cret@[::1]:4223",
        )
        .unwrap();
        assert_eq!(urls.user.as_deref(), Some("vulcan"));
        assert_eq!(urls.password.as_ref().map(Secret::expose), Some("s@cret"));
        assert_eq!(urls.shown(), "nats://127.0.0.1:4222,nats://[::1]:4223");
        assert!(!format!("{urls:?}").contains("cret"), "{urls:?}");
        let e = ServerUrls::parse("nats://a:bb@h:1,nats://c:dd@h:2").unwrap_err();
        assert!(
            !format!("{e:#}").contains("bb") && !format!("{e:#}").contains("dd"),
            "{e:#}"
        );
        // A user without a password is a token, as NATS URLs have it.
        let token = ServerUrls::parse("nats://t0ken@127.0.0.1:4222").unwrap();
        assert_eq!(token.token.as_ref().map(Secret::expose), Some("t0ken"));
        assert_eq!(token.user, None);
        let e = ServerUrls::parse("nats://u:hunter2@[bad").unwrap_err();
        assert!(!format!("{e:#}").contains("hunter2"), "{e:#}");
        assert!(ServerUrls::parse("tls://127.0.0.1:4222").unwrap().tls);
    }

    #[test]
    fn signatures_hold_only_for_the_same_secret_subject_and_payload() {
        let signer = Signer {
            key: b"cluster secret".to_vec(),
        };
        let headers = signer.sign("vulcan.kill.n1", b"{\"id\":1}");
        assert_eq!(
            signer.refusal("vulcan.kill.n1", Some(&headers), b"{\"id\":1}"),
            None
        );
        assert!(
            signer
                .refusal("vulcan.kill.n2", Some(&headers), b"{\"id\":1}")
                .is_some()
        );
        assert!(
            signer
                .refusal("vulcan.kill.n1", Some(&headers), b"{\"id\":2}")
                .is_some()
        );
        assert!(
            signer
                .refusal("vulcan.kill.n1", None, b"{\"id\":1}")
                .is_some()
        );
        let other = Signer {
            key: b"another".to_vec(),
        };
        assert!(
            other
                .refusal("vulcan.kill.n1", Some(&headers), b"{\"id\":1}")
                .is_some()
        );
        // An old signature, correctly made, is refused too.
        let old = (super::super::now_ms() - 120_000).to_string();
        let mac = hex::encode(signer.mac("s", &old, b"p").finalize().into_bytes());
        let mut stale = HeaderMap::new();
        stale.insert(SIGNED_AT_HEADER, old.as_str());
        stale.insert(SIGNATURE_HEADER, mac.as_str());
        assert_eq!(
            signer.refusal("s", Some(&stale), b"p"),
            Some("it was signed too long ago")
        );
    }
}
