//! Standard Webhooks signatures (<https://www.standardwebhooks.com>), the scheme Svix
//! and many receivers verify.
//!
//! The signed content is `{msg_id}.{timestamp}.{body}`; the signature is
//! `v1,<base64 of its HMAC-SHA256>` with the secret's bytes as key. Secrets are written
//! `whsec_<base64>`, as the reference libraries expect them.
//!
//! ```
//! use herald_sdk::webhooks::{self, Secret};
//!
//! let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
//! let body = br#"{"test": 2432232314}"#;
//! let headers = webhooks::headers(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
//! assert_eq!(headers[2].1, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
//! ```

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// A signing key. Its `Debug` output hides the bytes so it can't leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Parses the usual text form: `whsec_` followed by base64 of the key bytes. As in
    /// the reference libraries, the prefix is optional but the base64 is not, so the
    /// same text verifies on the receiver's side.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let encoded = text.trim();
        let encoded = encoded.strip_prefix(SECRET_PREFIX).unwrap_or(encoded);
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|err| SecretError(err.to_string()))?;
        Self::from_bytes(bytes)
    }

    /// A secret given as raw key bytes.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Result<Self, SecretError> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Err(SecretError("the secret is empty".into()));
        }
        Ok(Self(bytes))
    }

    fn mac(&self) -> HmacSha256 {
        match HmacSha256::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The text of a secret is not usable (not base64, or empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretError(String);

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not a Standard Webhooks secret (expected whsec_<base64>): {}",
            self.0
        )
    }
}

impl std::error::Error for SecretError {}

/// The `webhook-signature` value for one message: `v1,<base64 HMAC-SHA256>`.
///
/// `timestamp_secs` must be the same number sent as `webhook-timestamp`; take it from
/// [`crate::Event::now_ms`], the host's clock.
pub fn sign(secret: &Secret, msg_id: &str, timestamp_secs: i64, body: &[u8]) -> String {
    let mut mac = secret.mac();
    update_signed_content(&mut mac, msg_id, timestamp_secs, body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Whether a `webhook-signature` header value (one or more space-separated signatures,
/// as sent during key rotation) holds a valid `v1` signature of this message. Compares
/// in constant time. Receivers should also reject old timestamps; that is theirs to do.
pub fn verify(
    secret: &Secret,
    msg_id: &str,
    timestamp_secs: i64,
    body: &[u8],
    signature_header: &str,
) -> bool {
    signature_header.split_whitespace().any(|candidate| {
        let Some(encoded) = candidate.strip_prefix("v1,") else {
            return false;
        };
        let Ok(expected) = STANDARD.decode(encoded) else {
            return false;
        };
        let mut mac = secret.mac();
        update_signed_content(&mut mac, msg_id, timestamp_secs, body);
        mac.verify_slice(&expected).is_ok()
    })
}

/// The three Standard Webhooks headers, in order: `webhook-id`, `webhook-timestamp`,
/// `webhook-signature`. Pass the event's idempotency key as `msg_id` so the receiver
/// can drop repeats.
pub fn headers(
    secret: &Secret,
    msg_id: &str,
    timestamp_secs: i64,
    body: &[u8],
) -> [(String, String); 3] {
    [
        ("webhook-id".into(), msg_id.into()),
        ("webhook-timestamp".into(), timestamp_secs.to_string()),
        (
            "webhook-signature".into(),
            sign(secret, msg_id, timestamp_secs, body),
        ),
    ]
}

fn update_signed_content(mac: &mut HmacSha256, msg_id: &str, timestamp_secs: i64, body: &[u8]) {
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example of the Standard Webhooks / Svix reference libraries, checked
    // independently (Python's hmac module) to give exactly this signature.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_reference_example() {
        let secret = Secret::parse(SECRET).unwrap();
        assert_eq!(sign(&secret, MSG_ID, TIMESTAMP, BODY), SIGNATURE);
    }

    #[test]
    fn prefix_is_optional_and_raw_bytes_work() {
        let with = Secret::parse(SECRET).unwrap();
        let without = Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let raw = Secret::from_bytes(STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap())
            .unwrap();
        assert_eq!(with, without);
        assert_eq!(sign(&raw, MSG_ID, TIMESTAMP, BODY), SIGNATURE);
    }

    #[test]
    fn matches_an_hmac_computed_directly() {
        let key = b"raw key bytes";
        let mut mac = HmacSha256::new_from_slice(key).unwrap();
        mac.update(b"id-1.42.hello");
        let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        let secret = Secret::from_bytes(&key[..]).unwrap();
        assert_eq!(sign(&secret, "id-1", 42, b"hello"), expected);
    }

    #[test]
    fn rejects_bad_secrets() {
        assert!(Secret::parse("whsec_not base64!").is_err());
        assert!(Secret::parse("whsec_").is_err());
        assert!(Secret::from_bytes(Vec::new()).is_err());
        assert_eq!(
            format!("{:?}", Secret::parse(SECRET).unwrap()),
            "Secret(..)"
        );
    }

    #[test]
    fn verifies_and_rejects() {
        let secret = Secret::parse(SECRET).unwrap();
        assert!(verify(&secret, MSG_ID, TIMESTAMP, BODY, SIGNATURE));
        // Rotation: several signatures, one of them valid.
        let several = format!("v1,AAAA {SIGNATURE}");
        assert!(verify(&secret, MSG_ID, TIMESTAMP, BODY, &several));
        assert!(!verify(&secret, MSG_ID, TIMESTAMP + 1, BODY, SIGNATURE));
        assert!(!verify(&secret, MSG_ID, TIMESTAMP, b"{}", SIGNATURE));
        assert!(!verify(&secret, MSG_ID, TIMESTAMP, BODY, "v2,abc"));
    }

    #[test]
    fn headers_are_id_timestamp_signature() {
        let secret = Secret::parse(SECRET).unwrap();
        let [id, ts, sig] = headers(&secret, MSG_ID, TIMESTAMP, BODY);
        assert_eq!(id, ("webhook-id".into(), MSG_ID.into()));
        assert_eq!(ts, ("webhook-timestamp".into(), "1614265330".into()));
        assert_eq!(sig, ("webhook-signature".into(), SIGNATURE.into()));
    }
}
