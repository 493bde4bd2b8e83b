//! `handoff certs`: a private CA and a server certificate, for TLS without Kubernetes.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use handoff_controller::pki;

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Directory to write ca.crt, tls.crt and tls.key into (created if missing). Existing files
    /// are not overwritten.
    pub dir: PathBuf,
    /// Host names and IP addresses the server certificate is valid for (repeat for more).
    #[arg(long = "name", default_values = ["localhost", "127.0.0.1"])]
    pub names: Vec<String>,
    /// Also a client certificate with this name, signed by the same CA, for mutual TLS
    /// (`serve --tls-client-ca DIR/ca.crt`): DIR/client.crt and DIR/client.key.
    #[arg(long)]
    pub client: Option<String>,
}

fn write_new(path: &Path, contents: &str, private: bool) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!(
                "{} exists; remove it or choose another directory",
                path.display()
            )
        } else {
            format!("cannot write {}: {e}", path.display())
        }
    })?;
    file.write_all(contents.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

pub fn run(args: &CertsArgs) -> Result<(), String> {
    if args.names.is_empty() {
        return Err("give at least one --name the server is reached by".into());
    }
    let failed = |e: pki::Error| format!("cannot make the certificates: {e}");
    let authority = pki::Authority::new("handoff certs").map_err(failed)?;
    let (cert_pem, key_pem) = authority.server(args.names.clone()).map_err(failed)?;
    let client = args
        .client
        .as_deref()
        .map(|name| authority.client(name))
        .transpose()
        .map_err(failed)?;
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| format!("cannot create {}: {e}", args.dir.display()))?;
    let [ca, cert, key, client_cert, client_key] = [
        pki::CA_CERT_KEY,
        pki::TLS_CERT_KEY,
        pki::TLS_KEY_KEY,
        "client.crt",
        "client.key",
    ]
    .map(|name| args.dir.join(name));
    for path in [&ca, &cert, &key, &client_cert, &client_key] {
        if path.exists() {
            return Err(format!(
                "{} exists; remove it or choose another directory",
                path.display()
            ));
        }
    }
    write_new(&ca, authority.ca_pem(), false)?;
    write_new(&cert, &cert_pem, false)?;
    write_new(&key, &key_pem, true)?;
    println!(
        "wrote {} (clients: HANDOFF_TLS_CA), {} and {} (handoff serve --tls-cert --tls-key), for {}",
        ca.display(),
        cert.display(),
        key.display(),
        args.names.join(", ")
    );
    if let Some((cert_pem, key_pem)) = &client {
        write_new(&client_cert, cert_pem, false)?;
        write_new(&client_key, key_pem, true)?;
        println!(
            "wrote {} and {} (clients: HANDOFF_TLS_CLIENT_CERT, HANDOFF_TLS_CLIENT_KEY)",
            client_cert.display(),
            client_key.display()
        );
    }
    Ok(())
}
