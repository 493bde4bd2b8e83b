//! Bearer tokens: server-wide admin, writer and reader tokens, plus per-link tokens.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use handoff_store::Store;
use tonic::Status;
use tonic::metadata::MetadataMap;

/// Who may do what, server-wide. Per-link tokens live with their link in the store.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// `true` only when the operator asked for no auth explicitly.
    pub disabled: bool,
    /// May do everything, including creating links with tokens and deleting them.
    pub admin_tokens: Vec<String>,
    /// May write (and seal, commit, inspect) any link.
    pub writer_tokens: Vec<String>,
    /// May read (and inspect) any link.
    pub reader_tokens: Vec<String>,
}

impl AuthConfig {
    pub fn disabled() -> Self {
        Self {
            disabled: true,
            ..Self::default()
        }
    }

    pub fn with_admin(token: impl Into<String>) -> Self {
        Self {
            admin_tokens: vec![token.into()],
            ..Self::default()
        }
    }

    pub fn is_configured(&self) -> bool {
        self.disabled
            || !(self.admin_tokens.is_empty()
                && self.writer_tokens.is_empty()
                && self.reader_tokens.is_empty())
    }
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read rows.
    Read,
    /// Write, commit, abort, seal.
    Write,
    /// Look at metadata: stats, list, flight info schema. Readers and writers both may.
    Inspect,
    /// Create links with their own tokens, delete links.
    Admin,
}

/// Whom a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    Admin,
    Writer,
    Reader,
    LinkWriter(String),
    LinkReader(String),
}

impl Principal {
    pub fn may(&self, access: Access, link: Option<&str>) -> bool {
        let own = |l: &String| link == Some(l.as_str());
        match self {
            Principal::Anonymous | Principal::Admin => true,
            Principal::Writer => matches!(access, Access::Write | Access::Inspect),
            Principal::Reader => matches!(access, Access::Read | Access::Inspect),
            Principal::LinkWriter(l) => own(l) && matches!(access, Access::Write | Access::Inspect),
            Principal::LinkReader(l) => own(l) && matches!(access, Access::Read | Access::Inspect),
        }
    }

    /// Whether the link shows up in listings for this principal.
    pub fn sees(&self, link: &str) -> bool {
        match self {
            Principal::LinkWriter(l) | Principal::LinkReader(l) => l == link,
            _ => true,
        }
    }

    pub fn may_create(&self) -> bool {
        matches!(
            self,
            Principal::Anonymous | Principal::Admin | Principal::Writer
        )
    }
}

/// Compare without an early exit, so response times do not leak how much of a token matched.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of a request: `authorization: Bearer <t>`, or the password of Basic auth
/// (what pyarrow's `authenticate_basic_token` sends).
pub fn token_of(metadata: &MetadataMap) -> Option<String> {
    let value = metadata.get("authorization")?.to_str().ok()?.trim();
    if let Some(token) = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
    {
        return Some(token.trim().to_string());
    }
    let basic = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = BASE64.decode(basic.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (_, password) = text.split_once(':')?;
    Some(password.to_string())
}

pub const MISSING_TOKEN: &str = "missing bearer token: send 'authorization: Bearer <token>' (handoff CLI: --token or HANDOFF_TOKEN)";

impl AuthConfig {
    /// Identify the caller, or refuse with UNAUTHENTICATED.
    pub fn identify(&self, metadata: &MetadataMap, store: &Store) -> Result<Principal, Status> {
        if self.disabled {
            return Ok(Principal::Anonymous);
        }
        let token = token_of(metadata).ok_or_else(|| Status::unauthenticated(MISSING_TOKEN))?;
        if self.admin_tokens.iter().any(|t| same(t, &token)) {
            return Ok(Principal::Admin);
        }
        if self.writer_tokens.iter().any(|t| same(t, &token)) {
            return Ok(Principal::Writer);
        }
        if self.reader_tokens.iter().any(|t| same(t, &token)) {
            return Ok(Principal::Reader);
        }
        // Link tokens are kept hashed: hash the presented one once and compare digests.
        let hash = Some(handoff_store::TokenHash::of(&token));
        for link in store.list() {
            let tokens = link.tokens();
            if tokens.writer.is_some() && tokens.writer == hash {
                return Ok(Principal::LinkWriter(link.name().to_string()));
            }
            if tokens.reader.is_some() && tokens.reader == hash {
                return Ok(Principal::LinkReader(link.name().to_string()));
            }
        }
        Err(Status::unauthenticated(
            "invalid bearer token: check --token / HANDOFF_TOKEN against the server's tokens",
        ))
    }

    /// Identify the caller and check that it may do `access` on `link`.
    pub fn authorize(
        &self,
        metadata: &MetadataMap,
        store: &Store,
        access: Access,
        link: Option<&str>,
    ) -> Result<Principal, Status> {
        let principal = self.identify(metadata, store)?;
        if principal.may(access, link) {
            return Ok(principal);
        }
        let what = match access {
            Access::Read => "read",
            Access::Write => "write",
            Access::Inspect => "inspect",
            Access::Admin => "administer",
        };
        let target = link
            .map(|l| format!("link '{l}'"))
            .unwrap_or_else(|| "this server".into());
        Err(Status::permission_denied(format!(
            "this token may not {what} {target}; use {} token for it",
            match access {
                Access::Read => "a reader",
                Access::Admin => "an admin",
                Access::Write | Access::Inspect => "a writer",
            }
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_password_is_the_token() {
        let mut md = MetadataMap::new();
        // "user:s3cret"
        md.insert(
            "authorization",
            "Basic dXNlcjpzM2NyZXQ=".parse().expect("header"),
        );
        assert_eq!(token_of(&md).as_deref(), Some("s3cret"));
        md.insert("authorization", "Bearer abc".parse().expect("header"));
        assert_eq!(token_of(&md).as_deref(), Some("abc"));
    }

    /// Basic auth is RFC 7617's standard alphabet only: the old hand-written decoder also took
    /// URL-safe characters, and mixtures of the two.
    #[test]
    fn basic_auth_takes_one_alphabet() {
        let mut md = MetadataMap::new();
        // "u:??>" is "dTo/Pz4=" in the standard alphabet and "dTo_Pz4=" in the URL-safe one.
        md.insert("authorization", "Basic dTo/Pz4=".parse().expect("header"));
        assert_eq!(token_of(&md).as_deref(), Some("??>"));
        for mixed in ["Basic dTo_Pz4=", "Basic dTo/Pz4-", "Basic !!!!"] {
            md.insert("authorization", mixed.parse().expect("header"));
            assert_eq!(token_of(&md), None, "{mixed}");
        }
    }

    #[test]
    fn principals_are_scoped() {
        let w = Principal::LinkWriter("a".into());
        assert!(w.may(Access::Write, Some("a")));
        assert!(!w.may(Access::Write, Some("b")));
        assert!(!w.may(Access::Read, Some("a")));
        assert!(Principal::Reader.may(Access::Read, Some("x")));
        assert!(!Principal::Reader.may(Access::Write, Some("x")));
        assert!(!Principal::Writer.may(Access::Admin, None));
    }
}
