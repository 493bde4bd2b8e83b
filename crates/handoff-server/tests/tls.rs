//! TLS on the Flight port: a client that trusts the server's CA reads and writes; a wrong CA, a
//! plain-text client and (under mutual TLS) a client without a certificate from the client CA
//! are refused, and the server goes on serving the others.

mod common;

use common::{ADMIN, Fixture, batch, schema};
use futures::TryStreamExt;
use handoff_client::{ClientConfig, ClientError, HandoffClient};
use handoff_server::{ServerConfig, TlsConfig};
use handoff_store::StoreConfig;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

/// A CA, and certificates it signed: the server's for localhost and 127.0.0.1, and a client's.
struct Pki {
    ca_pem: Vec<u8>,
    server: (Vec<u8>, Vec<u8>),
    client: (Vec<u8>, Vec<u8>),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).expect("ca").pem().into_bytes();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).expect("sign");
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    };
    Pki {
        server: leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        client: leaf(vec!["a-client".into()], ExtendedKeyUsagePurpose::ClientAuth),
        ca_pem,
    }
}

async fn tls_server(pki: &Pki, mutual: bool) -> Fixture {
    let config = ServerConfig {
        tls: Some(TlsConfig {
            cert_pem: pki.server.0.clone(),
            key_pem: pki.server.1.clone(),
            client_ca_pem: mutual.then(|| pki.ca_pem.clone()),
        }),
        ..ServerConfig::default()
    };
    Fixture::start_with(config, StoreConfig::default()).await
}

async fn connect(
    endpoint: &str,
    ca: Option<&[u8]>,
    identity: Option<&(Vec<u8>, Vec<u8>)>,
) -> Result<HandoffClient, ClientError> {
    let mut config = ClientConfig::new(endpoint, Some(ADMIN.into()));
    config.tls_ca_pem = ca.map(<[u8]>::to_vec);
    config.tls_identity = identity.cloned();
    config.connect_timeout = std::time::Duration::from_secs(5);
    HandoffClient::connect_with(config).await
}

/// Create, write, seal and read back: the whole round trip works (or its first error).
async fn round_trip(client: &mut HandoffClient, link: &str) -> Result<usize, ClientError> {
    client
        .create(handoff_client::CreateLink {
            link: link.into(),
            ..Default::default()
        })
        .await?;
    let batches = futures::stream::iter(vec![Ok(batch(0, 100))]);
    client.put(link, batches).await?;
    client.seal(link).await?;
    let (_, streams) = client.read_link(link).await?;
    let mut rows = 0;
    for stream in streams {
        let batches = stream.try_collect::<Vec<_>>().await?;
        rows += batches.iter().map(|b| b.num_rows()).sum::<usize>();
    }
    Ok(rows)
}

#[tokio::test]
async fn a_client_that_trusts_the_ca_writes_and_reads_over_tls() {
    let pki = pki();
    let server = tls_server(&pki, false).await;
    assert!(server.endpoint.starts_with("grpc+tls://"));
    let mut client = connect(&server.endpoint, Some(&pki.ca_pem), None)
        .await
        .expect("connect with the CA");
    assert_eq!(round_trip(&mut client, "l").await.expect("round trip"), 100);
    assert_eq!(client.schema("l").await.expect("schema"), schema());
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_ca_is_refused_with_a_certificate_error() {
    let pki = pki();
    let server = tls_server(&pki, false).await;
    let other = self::pki();
    let err = connect(&server.endpoint, Some(&other.ca_pem), None)
        .await
        .expect_err("a CA that did not sign the server's certificate");
    let message = err.to_string();
    assert!(matches!(err, ClientError::Connect { .. }), "{message}");
    assert!(
        message.contains("certificate") && message.contains("HANDOFF_TLS_CA"),
        "names the certificate and the fix: {message}"
    );
    // No CA at all: the system's roots do not know a private CA either.
    let err = connect(&server.endpoint, None, None)
        .await
        .expect_err("system roots");
    assert!(err.to_string().contains("certificate"), "{err}");
    // The server goes on for clients that trust it.
    let mut good = connect(&server.endpoint, Some(&pki.ca_pem), None)
        .await
        .expect("connect");
    assert_eq!(
        round_trip(&mut good, "after").await.expect("round trip"),
        100
    );
    server.stop().await;
}

#[tokio::test]
async fn a_plain_text_client_gets_nothing_from_a_tls_server() {
    let pki = pki();
    let server = tls_server(&pki, false).await;
    let plain = server.endpoint.replace("grpc+tls://", "grpc://");
    let outcome = async {
        let mut client = connect(&plain, None, None).await?;
        client.list().await
    }
    .await;
    let err = outcome.expect_err("plain HTTP/2 against a TLS port");
    assert!(
        matches!(
            err.code(),
            None | Some(tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal)
        ),
        "{err}"
    );
    // And a TLS client against a plain-text server fails at the handshake, naming TLS.
    let plain_server = Fixture::start().await;
    let err = connect(
        &plain_server.endpoint.replace("grpc://", "grpc+tls://"),
        Some(&pki.ca_pem),
        None,
    )
    .await
    .expect_err("TLS against a plain port");
    assert!(err.to_string().contains("--tls-cert"), "{err}");
    let mut good = connect(&server.endpoint, Some(&pki.ca_pem), None)
        .await
        .expect("connect");
    assert_eq!(round_trip(&mut good, "l").await.expect("round trip"), 100);
    plain_server.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_serves_only_clients_with_a_certificate_from_the_client_ca() {
    let pki = pki();
    let server = tls_server(&pki, true).await;
    // Without a certificate: the handshake fails (at connect, or at the first call under TLS
    // 1.3, where the client learns of the refusal after its own handshake is done).
    let anonymous = async {
        let mut client = connect(&server.endpoint, Some(&pki.ca_pem), None).await?;
        client.list().await
    }
    .await;
    assert!(anonymous.is_err(), "no client certificate: {anonymous:?}");
    // A certificate from another CA: refused too.
    let stranger = self::pki();
    let foreign = async {
        let mut client =
            connect(&server.endpoint, Some(&pki.ca_pem), Some(&stranger.client)).await?;
        client.list().await
    }
    .await;
    assert!(
        foreign.is_err(),
        "a certificate from another CA: {foreign:?}"
    );
    // A certificate the client CA signed: served.
    let mut client = connect(&server.endpoint, Some(&pki.ca_pem), Some(&pki.client))
        .await
        .expect("connect with a client certificate");
    assert_eq!(round_trip(&mut client, "l").await.expect("round trip"), 100);
    server.stop().await;
}

#[tokio::test]
async fn tls_settings_that_cannot_work_are_refused_up_front() {
    let pki = pki();
    // A CA with a plain endpoint would send the token in clear.
    let err = connect("grpc://127.0.0.1:1", Some(&pki.ca_pem), None)
        .await
        .expect_err("CA with grpc://");
    assert!(matches!(err, ClientError::Tls(_)), "{err}");
    assert!(err.to_string().contains("grpc+tls://"), "{err}");

    // A server given something that is not PEM says so before it listens.
    let err = refused_at_start(b"not a certificate".to_vec(), pki.server.1.clone()).await;
    assert!(err.contains("not PEM"), "{err}");
    // A key that does not parse.
    let bad_key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_vec();
    let err = refused_at_start(pki.server.0.clone(), bad_key).await;
    assert!(err.contains("TLS"), "{err}");
}

/// What `serve` says when it refuses to start with this certificate and key.
async fn refused_at_start(cert_pem: Vec<u8>, key_pem: Vec<u8>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let config = ServerConfig {
        auth: handoff_server::AuthConfig::disabled(),
        tls: Some(TlsConfig {
            cert_pem,
            key_pem,
            client_ca_pem: None,
        }),
        ..ServerConfig::default()
    };
    let store = handoff_store::Store::new(StoreConfig::default());
    handoff_server::serve(store, config, listener, None, std::future::pending())
        .await
        .expect_err("refused before listening")
        .to_string()
}
