//! Where `import` may read from. Import reads with the server's own reach: its filesystem and
//! its object-storage credentials. So it is off until the operator names URL prefixes
//! (`serve --import-allow`), and a URL is allowed only under one of them. `file://` is never
//! implied: only a `file://` prefix in the list allows local files.

use tonic::Status;
use url::Url;

/// URL prefixes import may read under; empty means import is off.
#[derive(Debug, Clone, Default)]
pub struct ImportAllowlist {
    prefixes: Vec<Url>,
}

/// The URL with its glob left out: `s3://b/path/*.parquet` is checked as `s3://b/path/`.
fn parse(text: &str) -> Result<Url, String> {
    let cut = text.find(['*', '?', '[', '{']).unwrap_or(text.len());
    Url::parse(&text[..cut])
        .map_err(|e| format!("'{}' is not a URL ({e})", handoff_store::echo(text)))
}

impl ImportAllowlist {
    /// Checks each prefix: a URL with a scheme and, except for `file://`, a bucket or host.
    pub fn new(prefixes: &[String]) -> Result<Self, String> {
        let prefixes = prefixes
            .iter()
            .map(|p| {
                let url = parse(p)?;
                if url.scheme() != "file" && url.host_str().is_none_or(str::is_empty) {
                    return Err(format!(
                        "--import-allow '{p}' names no bucket or host; use e.g. s3://bucket/prefix"
                    ));
                }
                Ok(url)
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self { prefixes })
    }

    pub fn is_off(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// OK if `url` lies under an allowed prefix. Parsing resolves `..` and `%2e%2e`, so a path
    /// cannot climb out of its prefix; a prefix matches whole path segments only.
    pub fn check(&self, url: &str) -> Result<(), Status> {
        if self.is_off() {
            return Err(Status::permission_denied(
                "import is off on this server: start it with --import-allow URL_PREFIX (for example s3://bucket/warehouse/) to allow imports from there",
            ));
        }
        let asked = parse(url).map_err(Status::invalid_argument)?;
        let under = |prefix: &Url| {
            if asked.scheme() != prefix.scheme()
                || asked.host_str() != prefix.host_str()
                || asked.port() != prefix.port()
            {
                return false;
            }
            let (have, want) = (asked.path(), prefix.path().trim_end_matches('/'));
            have == want
                || have
                    .strip_prefix(want)
                    .is_some_and(|rest| rest.starts_with('/'))
        };
        if self.prefixes.iter().any(under) {
            return Ok(());
        }
        let allowed: Vec<&str> = self.prefixes.iter().map(Url::as_str).collect();
        Err(Status::permission_denied(format!(
            "import from '{}' is not allowed on this server; it imports only under {}",
            handoff_store::echo(url),
            allowed.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(prefixes: &[&str]) -> ImportAllowlist {
        let prefixes: Vec<String> = prefixes.iter().map(|p| p.to_string()).collect();
        ImportAllowlist::new(&prefixes).expect("valid")
    }

    #[test]
    fn off_until_prefixes_are_named() {
        let err = list(&[]).check("s3://b/x.parquet").expect_err("off");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains("--import-allow"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn only_urls_under_a_prefix_pass() {
        let allow = list(&["s3://warehouse/features", "file:///data/in/"]);
        for ok in [
            "s3://warehouse/features/part-0.parquet",
            "s3://warehouse/features/*.parquet",
            "s3://warehouse/features",
            "file:///data/in/a.parquet",
        ] {
            allow.check(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for refused in [
            "s3://warehouse/features-private/x.parquet", // a prefix is whole segments
            "s3://other/features/x.parquet",
            "file:///etc/passwd",
            "file:///data/in/../../etc/passwd",
            "file:///data/in/%2e%2e/%2e%2e/etc/passwd",
            "gs://warehouse/features/x.parquet",
        ] {
            let err = allow.check(refused).expect_err(refused);
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{refused}");
        }
        // Local files only when a file:// prefix is listed.
        let err = list(&["s3://warehouse/"])
            .check("file:///tmp/x.parquet")
            .expect_err("file");
        assert!(
            err.message().contains("only under s3://warehouse/"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn bad_prefixes_are_refused_at_start() {
        for bad in ["warehouse/features", "s3:///nobucket"] {
            assert!(ImportAllowlist::new(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
