//! The NATS boundary: nodes that authenticate to a real `nats-server` with a
//! user and password, and with TLS and a client certificate (made here with
//! `openssl`); a wrong password that stops the node without printing it; and
//! a forged kill from a raw NATS client that a cluster secret turns away.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::support::*;

/// Runs `hello` through `server` and checks it completed.
async fn runs_hello(server: &Server) {
    let (status, record) = server.run_wasm("hello", "").await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["status"], "completed", "{record}");
}

/// `vulcan serve` that is expected not to start: its exit code and stderr.
fn refused_start(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> (i32, String) {
    let mut full = vec!["serve", "--listen", "127.0.0.1:0"];
    full.extend_from_slice(args);
    let mut cmd = env.cmd(&full);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code().unwrap_or(-1), stderr(&out))
}

#[tokio::test]
async fn a_node_joins_with_a_user_and_password_and_never_prints_them() {
    let Some(nats) = Nats::start_with(&["--user", "vulcan", "--pass", "pw-Zq81xK"]) else {
        return;
    };
    let plain = nats.url();
    let with_secret = plain.replace("nats://", "nats://vulcan:pw-Zq81xK@");

    // In the URL.
    let env = Env::new();
    let node = Server::start(&env, &["--cluster", &with_secret, "--node-id", "a"]);
    runs_hello(&node).await;
    drop(node);

    // From the environment, the URL bare.
    let env = Env::new();
    let mut cmd = env.cmd(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--cluster",
        &plain,
        "--node-id",
        "b",
    ]);
    cmd.env("VULCAN_CLUSTER_USER", "vulcan")
        .env("VULCAN_CLUSTER_PASSWORD", "pw-Zq81xK");
    let node = Server::spawned(cmd);
    runs_hello(&node).await;
    drop(node);

    // Without credentials, and with a wrong password: exit 2, no secret shown.
    let env = Env::new();
    let (code, err) = refused_start(&env, &["--cluster", &plain], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("failed to connect to the cluster at nats://127.0.0.1:"),
        "{err}"
    );
    let wrong = plain.replace("nats://", "nats://vulcan:wrong-Hq55@");
    let (code, err) = refused_start(&env, &["--cluster", &wrong], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.to_lowercase().contains("authoriz"), "{err}");
    assert!(
        !err.contains("wrong-Hq55"),
        "the password was printed: {err}"
    );
    let (code, err) = refused_start(
        &env,
        &["--cluster", &plain],
        &[
            ("VULCAN_CLUSTER_USER", "vulcan"),
            ("VULCAN_CLUSTER_PASSWORD", "wrong-Hq55"),
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        !err.contains("wrong-Hq55"),
        "the password was printed: {err}"
    );
}

#[tokio::test]
async fn a_node_joins_with_a_token_or_an_nkey() {
    // A token, in the URL or from the environment.
    let Some(nats) = Nats::start_with(&["--auth", "tok-Vd93mZ"]) else {
        return;
    };
    let env = Env::new();
    let url = nats.url().replace("nats://", "nats://tok-Vd93mZ@");
    runs_hello(&Server::start(&env, &["--cluster", &url])).await;
    let env = Env::new();
    let mut cmd = env.cmd(&["serve", "--listen", "127.0.0.1:0", "--cluster", &nats.url()]);
    cmd.env("VULCAN_CLUSTER_TOKEN", "tok-Vd93mZ");
    runs_hello(&Server::spawned(cmd)).await;
    let (code, err) = refused_start(
        &env,
        &["--cluster", &nats.url()],
        &[("VULCAN_CLUSTER_TOKEN", "tok-wrong-77")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        !err.contains("tok-wrong-77"),
        "the token was printed: {err}"
    );
    drop(nats);

    // An nkey: the server knows the public key, the node holds the seed.
    let user = nkeys::KeyPair::new_user();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nats.conf");
    std::fs::write(
        &config,
        format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let Some(nats) = Nats::start_with(&["-c", config.to_str().unwrap()]) else {
        return;
    };
    let seed = dir.path().join("vulcan.nk");
    std::fs::write(&seed, format!("{}\n", user.seed().unwrap())).unwrap();
    let env = Env::new();
    runs_hello(&Server::start(
        &env,
        &[
            "--cluster",
            &nats.url(),
            "--cluster-nkey",
            seed.to_str().unwrap(),
        ],
    ))
    .await;
    // Another key is refused, and no seed is printed.
    let other = nkeys::KeyPair::new_user();
    std::fs::write(&seed, other.seed().unwrap()).unwrap();
    let (code, err) = refused_start(
        &env,
        &[
            "--cluster",
            &nats.url(),
            "--cluster-nkey",
            seed.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        !err.contains(&other.seed().unwrap()),
        "the seed was printed: {err}"
    );
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian's openssl package) is needed to make test certificates");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=vulcan test CA"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(dir, &ca);
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let mut req = vec!["req", "-subj"];
        let subject = format!("/CN=vulcan test {name}");
        req.push(&subject);
        req.extend_from_slice(&ec);
        let (key, csr, pem, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        req.extend_from_slice(&["-keyout", &key, "-out", &csr]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &extfile,
            ],
        );
    }
}

#[tokio::test]
async fn a_node_joins_over_tls_with_a_client_certificate() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let file = |name: &str| certs.path().join(name).to_str().unwrap().to_owned();
    let Some(nats) = Nats::start_with(&[
        "--tls",
        "--tlscert",
        &file("server.pem"),
        "--tlskey",
        &file("server.key"),
        "--tlsverify",
        "--tlscacert",
        &file("ca.pem"),
    ]) else {
        return;
    };
    let url = nats.url().replace("nats://", "tls://");
    let env = Env::new();
    let node = Server::start(
        &env,
        &[
            "--cluster",
            &url,
            "--cluster-ca",
            &file("ca.pem"),
            "--cluster-cert",
            &file("client.pem"),
            "--cluster-key",
            &file("client.key"),
        ],
    );
    runs_hello(&node).await;
    drop(node);

    // A server whose certificate's CA the node was not given is not trusted.
    let env = Env::new();
    let (code, err) = refused_start(
        &env,
        &[
            "--cluster",
            &url,
            "--cluster-cert",
            &file("client.pem"),
            "--cluster-key",
            &file("client.key"),
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("failed to connect to the cluster"), "{err}");
    // Nor is a node without a client certificate.
    let (code, err) = refused_start(
        &env,
        &["--cluster", &url, "--cluster-ca", &file("ca.pem")],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(!err.contains("BEGIN"), "key material was printed: {err}");
}

#[tokio::test]
async fn a_forged_kill_from_a_raw_nats_client_does_not_kill() {
    let Some(nats) = Nats::start() else { return };
    let secret = "0123456789abcdef-secret";
    let (e1, e2) = (Env::new(), Env::new());
    let flags = |id: &'static str| {
        [
            "--cluster",
            &nats.url(),
            "--node-id",
            id,
            "--cluster-secret",
            secret,
        ]
        .map(String::from)
    };
    let n1_flags = flags("n1");
    let n1 = Server::start(&e1, &n1_flags.each_ref().map(String::as_str));
    let n2_flags = flags("n2");
    let n2 = Server::start(&e2, &n2_flags.each_ref().map(String::as_str));
    // Submitted to n1, which has a free slot: it runs there.
    let id = n1.start_wasm("sleep", "arg=60000").await;
    let record = eventually("the workload runs", || async {
        let (_, r) = n1.get_json(&format!("/v1/workloads/{id}")).await;
        (r["status"] == "running").then_some(r)
    })
    .await;
    assert_eq!(record["node"], "n1", "{record}");

    // Anyone on the bus can publish a kill; n1 refuses one not signed with
    // the cluster's secret, or signed with another.
    let raw = async_nats::connect(format!("127.0.0.1:{}", nats.port))
        .await
        .unwrap();
    let forged = json!({"id": id, "reason": "killed: forged"}).to_string();
    let answer = raw
        .request("vulcan.kill.n1", forged.clone().into())
        .await
        .unwrap();
    assert_eq!(&answer.payload[..], b"refused");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Vulcan-Signed-At", "1");
    headers.insert("Vulcan-Signature", "00ff");
    let answer = raw
        .request_with_headers("vulcan.kill.n1", headers, forged.into())
        .await
        .unwrap();
    assert_eq!(&answer.payload[..], b"refused");
    let (_, record) = n2.get_json(&format!("/v1/workloads/{id}")).await;
    assert_eq!(record["status"], "running", "{record}");

    // A kill through n2's API travels to n1 signed, and kills.
    let (status, answer) = n2.kill(&id).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "killed", "{answer}");
}
