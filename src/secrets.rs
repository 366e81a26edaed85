//! Secret values and the crypto around them.
//!
//! - [`SecretString`]: a decrypted credential or webhook secret in memory. `Debug`/`Display` print
//!   `[redacted]`, the bytes are zeroized on drop; the only way to read it is `expose()`.
//! - [`MasterKey`]: `SPARKY_MASTER_KEY` (base64 of 32 bytes). Encrypts `bot_credentials.api_key` and
//!   `api_secret` with AES-256-GCM. A stored value is `enc:v1:<key id>:<base64(nonce || ciphertext)>`;
//!   the key id (8 hex chars derived from the key) says which key wrote it so keys can be rotated: a
//!   `MasterKey` carries the retired keys it replaced (`SPARKY_OLD_MASTER_KEYS`), which still decrypt
//!   but never encrypt, and `sparky credentials rotate-key` re-encrypts every row under the current
//!   key ([`reseal`]). The associated data binds a ciphertext to its user and column, so a value copied to another row does
//!   not decrypt. A value without the `enc:v1:` prefix is a legacy plaintext row (the original system
//!   wrote those) and is used as it is.
//! - Webhook secrets: 32 random bytes, shown once as `sk_<hex>`; only their SHA-256 is stored. They are
//!   high-entropy random tokens, not passwords, so a fast hash is the right tool (no salt/KDF needed).
//!   A presented secret is never compared with a stored one byte by byte: it is hashed, and the hash
//!   is the look-up key (in-process cache, then the `webhook_secrets` primary key). The time a
//!   look-up takes depends only on the SHA-256 of what the caller sent, which the caller cannot steer
//!   towards a stored hash, so timing reveals nothing about any stored secret. The one comparison of
//!   two secret-derived values that remains (the secret's owner against the body's `user_id`) uses
//!   `subtle::ConstantTimeEq`.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A string that must never be printed. Zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(s: impl Into<String>) -> Self {
        SecretString(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// For command-line arguments (`--api-secret`): parsing never fails, and the parsed argument prints
/// `[redacted]` wherever the CLI's arguments are debug-printed.
impl std::str::FromStr for SecretString {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretString::new(s))
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("expected base64 of exactly 32 bytes")]
    BadKey,
    #[error("value was encrypted with key id {0}, which is not configured (SPARKY_MASTER_KEY / SPARKY_OLD_MASTER_KEYS)")]
    UnknownKey(String),
    #[error("value is encrypted but no SPARKY_MASTER_KEY is configured")]
    NoKey,
    #[error("encrypted value is malformed or was tampered with")]
    Corrupt,
}

const PREFIX: &str = "enc:v1:";

/// The AES-256 key that protects credentials at rest.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey {
    key: [u8; 32],
    #[zeroize(skip)]
    id: String,
    /// Keys this one replaced: they decrypt values they wrote, never encrypt. Each zeroizes itself.
    #[zeroize(skip)]
    retired: Vec<MasterKey>,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey(id={}, [redacted]", self.id)?;
        if !self.retired.is_empty() {
            let ids: Vec<&str> = self.retired.iter().map(|k| k.id.as_str()).collect();
            write!(f, ", retired={}", ids.join(","))?;
        }
        f.write_str(")")
    }
}

impl MasterKey {
    pub fn from_base64(s: &str) -> Result<MasterKey, CryptoError> {
        let mut bytes = B64.decode(s.trim()).map_err(|_| CryptoError::BadKey)?;
        if bytes.len() != 32 {
            bytes.zeroize();
            return Err(CryptoError::BadKey);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes);
        bytes.zeroize();
        let digest = Sha256::new()
            .chain_update(b"sparky-key-id")
            .chain_update(key)
            .finalize();
        Ok(MasterKey {
            key,
            id: hex::encode(&digest[..4]),
            retired: Vec::new(),
        })
    }

    /// This key, still able to decrypt what `retired` keys wrote (key rotation). A retired key equal
    /// to this one is dropped; retired keys of the retired keys are not kept.
    pub fn with_retired(mut self, retired: Vec<MasterKey>) -> MasterKey {
        let mut kept: Vec<MasterKey> = Vec::new();
        for mut k in retired {
            if k.id != self.id && !kept.iter().any(|x| x.id == k.id) {
                k.retired.clear();
                kept.push(k);
            }
        }
        self.retired = kept;
        self
    }

    /// Ids of the retired keys this key still decrypts for.
    pub fn retired_ids(&self) -> Vec<&str> {
        self.retired.iter().map(|k| k.id.as_str()).collect()
    }

    /// The key (this one or a retired one) with id `kid`.
    fn find(&self, kid: &str) -> Option<&MasterKey> {
        if self.id == kid {
            return Some(self);
        }
        self.retired.iter().find(|k| k.id == kid)
    }

    /// A new random key, base64-encoded (what `scripts/run-local` writes into `.env`).
    pub fn generate_base64() -> String {
        let mut k = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut k);
        let s = B64.encode(k);
        k.zeroize();
        s
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Encrypt `plaintext`, bound to `aad` (e.g. `"<user_id>:api_secret"`).
    pub fn encrypt(&self, plaintext: &str, aad: &str) -> String {
        let cipher = Aes256Gcm::new_from_slice(&self.key).expect("32-byte key");
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of a short value cannot fail");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ct);
        format!("{PREFIX}{}:{}", self.id, B64.encode(blob))
    }

    fn decrypt_blob(&self, b64: &str, aad: &str) -> Result<SecretString, CryptoError> {
        let blob = B64.decode(b64).map_err(|_| CryptoError::Corrupt)?;
        if blob.len() < 12 + 16 {
            return Err(CryptoError::Corrupt);
        }
        let cipher = Aes256Gcm::new_from_slice(&self.key).expect("32-byte key");
        let mut pt = cipher
            .decrypt(
                Nonce::from_slice(&blob[..12]),
                Payload {
                    msg: &blob[12..],
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Corrupt)?;
        let s = String::from_utf8(pt.clone()).map_err(|_| CryptoError::Corrupt);
        pt.zeroize();
        s.map(SecretString::new)
    }
}

/// Is this stored value encrypted (as opposed to a legacy plaintext row)?
pub fn is_encrypted(stored: &str) -> bool {
    stored.starts_with(PREFIX)
}

/// Decrypt a stored value with whichever of `keys` wrote it; plaintext values pass through.
pub fn open(stored: &str, aad: &str, keys: &[&MasterKey]) -> Result<SecretString, CryptoError> {
    let Some(rest) = stored.strip_prefix(PREFIX) else {
        return Ok(SecretString::new(stored));
    };
    let (kid, b64) = rest.split_once(':').ok_or(CryptoError::Corrupt)?;
    if keys.is_empty() {
        return Err(CryptoError::NoKey);
    }
    let key = keys
        .iter()
        .find_map(|k| k.find(kid))
        .ok_or_else(|| CryptoError::UnknownKey(kid.to_string()))?;
    key.decrypt_blob(b64, aad)
}

/// The id of the key that encrypted a stored value (`None` for legacy plaintext).
pub fn key_id_of(stored: &str) -> Option<&str> {
    stored.strip_prefix(PREFIX)?.split_once(':').map(|(k, _)| k)
}

/// A stored value as it should be under `key`: plaintext and values written by a retired key are
/// (re-)encrypted under `key`; `None` when the value already is. The plaintext exists only inside a
/// zeroizing [`SecretString`] during the call.
pub fn reseal(stored: &str, aad: &str, key: &MasterKey) -> Result<Option<String>, CryptoError> {
    if key_id_of(stored) == Some(key.id()) {
        return Ok(None);
    }
    let plain = open(stored, aad, &[key])?;
    Ok(Some(key.encrypt(plain.expose(), aad)))
}

/// A fresh webhook secret, as shown to the user once.
pub fn generate_webhook_secret() -> SecretString {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    let s = SecretString::new(format!("sk_{}", hex::encode(b)));
    b.zeroize();
    s
}

/// What is stored for a webhook secret: hex SHA-256.
pub fn hash_webhook_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A fresh API token (`sparky user token create`), shown to the user once. `sat_` (Sparky API
/// token) tells it apart from a webhook secret (`sk_`) at a glance; the two are never interchangeable.
pub fn generate_api_token() -> SecretString {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    let s = SecretString::new(format!("sat_{}", hex::encode(b)));
    b.zeroize();
    s
}

/// What is stored for an API token: hex SHA-256 (a random 256-bit token, like a webhook secret:
/// no KDF needed, and the hash is the look-up key, so timing says nothing about stored tokens).
pub fn hash_api_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::from_base64(&MasterKey::generate_base64()).unwrap()
    }

    #[test]
    fn round_trip_and_binding() {
        let k = key();
        let c = k.encrypt("my-api-secret", "u1:api_secret");
        assert!(is_encrypted(&c));
        assert!(!c.contains("my-api-secret"));
        assert_eq!(
            open(&c, "u1:api_secret", &[&k]).unwrap().expose(),
            "my-api-secret"
        );
        // copied to another user's row: does not decrypt
        assert_eq!(
            open(&c, "u2:api_secret", &[&k]).unwrap_err(),
            CryptoError::Corrupt
        );
        // another key
        let other = key();
        assert!(matches!(
            open(&c, "u1:api_secret", &[&other]),
            Err(CryptoError::UnknownKey(_))
        ));
        assert_eq!(
            open(&c, "u1:api_secret", &[]).unwrap_err(),
            CryptoError::NoKey
        );
        // legacy plaintext passes through
        assert_eq!(open("plain", "x", &[]).unwrap().expose(), "plain");
    }

    #[test]
    fn retired_keys_decrypt_and_reseal_moves_to_the_current_key() {
        let old = key();
        let c = old.encrypt("s3cr3t", "u1:api_key");
        let new = key().with_retired(vec![old.clone()]);
        assert_eq!(new.retired_ids(), vec![old.id()]);
        assert_eq!(open(&c, "u1:api_key", &[&new]).unwrap().expose(), "s3cr3t");
        let moved = reseal(&c, "u1:api_key", &new).unwrap().unwrap();
        assert_eq!(key_id_of(&moved), Some(new.id()));
        assert_eq!(reseal(&moved, "u1:api_key", &new).unwrap(), None);
        // once the old key is no longer configured, the re-encrypted value still opens
        let only_new = new.clone().with_retired(vec![]);
        assert_eq!(
            open(&moved, "u1:api_key", &[&only_new]).unwrap().expose(),
            "s3cr3t"
        );
        assert!(matches!(
            open(&c, "u1:api_key", &[&only_new]),
            Err(CryptoError::UnknownKey(_))
        ));
        // plaintext is sealed; a retired key's debug shows ids only
        let sealed = reseal("plain", "u1:api_key", &new).unwrap().unwrap();
        assert!(is_encrypted(&sealed) && !sealed.contains("plain"));
        assert!(format!("{new:?}").contains(&format!("retired={}", old.id())));
    }

    #[test]
    fn secrets_are_redacted() {
        let s = SecretString::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        let k = key();
        assert!(!format!("{k:?}").contains(&B64.encode(k.key)));
    }

    #[test]
    fn bad_master_keys_are_refused() {
        assert!(MasterKey::from_base64("not base64!").is_err());
        assert!(MasterKey::from_base64(&B64.encode([0u8; 16])).is_err());
    }

    #[test]
    fn webhook_secret_hash_is_stable() {
        let s = generate_webhook_secret();
        assert!(s.expose().starts_with("sk_") && s.expose().len() == 67);
        // Known answers (SHA-256, hex): stored hashes are look-up keys, so a change of the hash
        // would orphan every stored secret. The first is FIPS 180-2's "abc"; the second was
        // computed independently (Python hashlib).
        assert_eq!(
            hash_webhook_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hash_webhook_secret(
                "sk_000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
            ),
            "f976a7b8551e0831cfb0063814258850280a4fd32f023e3378eb1ce67b9c5328"
        );
    }

    /// A value written in the `enc:v1:` format, made independently of this code (Python
    /// `cryptography`: AES-256-GCM, key bytes 0..31, nonce bytes 0xa0..0xab, AAD
    /// `u1:api_secret`; key id = hex of the first 4 bytes of SHA-256("sparky-key-id" || key)).
    /// Every stored credential is in this format: a change of the cipher, the nonce layout, the
    /// AAD, the key id or the encoding must fail here rather than orphan them.
    #[test]
    fn a_fixed_enc_v1_value_decrypts() {
        let k = MasterKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        assert_eq!(k.id(), "85980c69");
        let stored = "enc:v1:85980c69:oKGio6Slpqeoqaqri2FRTDWiL8wHBvW2cwUjWF4PpW/1YjQvuq2Ac5k=";
        assert!(is_encrypted(stored));
        assert_eq!(key_id_of(stored), Some("85980c69"));
        assert_eq!(
            open(stored, "u1:api_secret", &[&k]).unwrap().expose(),
            "my-api-secret"
        );
        // The AAD is part of the format: another row's does not open it.
        assert_eq!(
            open(stored, "u2:api_secret", &[&k]).unwrap_err(),
            CryptoError::Corrupt
        );
        // And this code writes the same layout: prefix, key id, base64 of a 12-byte nonce, the
        // ciphertext and a 16-byte tag.
        let fresh = k.encrypt("my-api-secret", "u1:api_secret");
        let blob = B64
            .decode(
                fresh
                    .strip_prefix("enc:v1:85980c69:")
                    .expect("prefix and key id"),
            )
            .unwrap();
        assert_eq!(blob.len(), 12 + "my-api-secret".len() + 16);
    }
}
