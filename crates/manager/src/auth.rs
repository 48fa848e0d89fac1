//! Who is asking: passwords (Argon2id), sign-in tokens (JWT, HS256, with a key generated
//! once and kept in the database), personal access tokens (random, stored only as their
//! SHA-256), and the first root account.

use crate::models::{created, Role, User};
use crate::store::{now, Result, RowExt, Store, StoreError};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::time::Duration;

/// The setting that holds the JWT signing key.
const JWT_KEY_SETTING: &str = "jwt_signing_key";
/// Environment variable with the first root password (as upstream).
pub const ROOT_PASSWORD_ENV: &str = "DRAGONFLY_INITIAL_ROOT_PASSWORD";
/// Shortest password accepted.
pub const MIN_PASSWORD: usize = 8;

/// Hashes a password with Argon2id and a random salt.
pub fn hash_password(password: &str) -> String {
    let mut salt = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).expect("16 bytes encode");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters")
        .to_string()
}

/// Whether `password` matches a stored hash.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A random token: 32 bytes as hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// What is stored of a personal access token.
pub fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// The claims of a sign-in token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user ID.
    pub sub: i64,
    pub name: String,
    pub role: String,
    pub exp: i64,
    pub iat: i64,
    pub iss: String,
}

/// Issues and checks sign-in tokens.
#[derive(Clone)]
pub struct Jwt {
    encoding: jsonwebtoken::EncodingKey,
    decoding: jsonwebtoken::DecodingKey,
    realm: String,
    timeout: Duration,
}

impl Jwt {
    /// The key kept in the store (generated at first start; a configured key wins).
    pub async fn load(
        store: &Store,
        configured: Option<&str>,
        realm: &str,
        timeout: Duration,
    ) -> Result<Jwt> {
        let key = match configured.filter(|k| !k.is_empty()) {
            Some(k) => k.to_string(),
            None => {
                store
                    .setting_or_insert(JWT_KEY_SETTING, &random_token())
                    .await?
            }
        };
        Ok(Jwt {
            encoding: jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
            decoding: jsonwebtoken::DecodingKey::from_secret(key.as_bytes()),
            realm: realm.to_string(),
            timeout,
        })
    }

    pub fn issue(&self, user: &User) -> (String, i64) {
        let iat = now();
        let exp = iat + self.timeout.as_secs() as i64;
        let claims = Claims {
            sub: user.id,
            name: user.name.clone(),
            role: user.role.clone(),
            exp,
            iat,
            iss: self.realm.clone(),
        };
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &self.encoding,
        )
        .expect("HS256 signs any claims");
        (token, exp)
    }

    /// The claims of a valid, unexpired token of this manager.
    pub fn check(&self, token: &str) -> Option<Claims> {
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_issuer(&[&self.realm]);
        validation.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .ok()
            .map(|d| d.claims)
    }
}

/// Creates the root account when there is none: with the password from
/// [`ROOT_PASSWORD_ENV`], or a generated one that is returned (to print once).
pub async fn ensure_root(store: &Store, env_password: Option<String>) -> Result<Option<String>> {
    let existing = store
        .fetch_optional("SELECT id FROM users WHERE name = ?", &["root".into()])
        .await?;
    if existing.is_some() {
        return Ok(None);
    }
    let (password, generated) = match env_password.filter(|p| !p.is_empty()) {
        Some(p) => (p, false),
        None => (random_token()[..24].to_string(), true),
    };
    let mut fields = vec![
        ("name", "root".into()),
        ("email", "".into()),
        ("password_hash", hash_password(&password).into()),
        ("state", "enable".into()),
        ("role", Role::Root.as_str().into()),
    ];
    fields.extend(created());
    match store.insert("users", &fields).await {
        Ok(_) => Ok(generated.then_some(password)),
        Err(StoreError::Conflict(_)) => Ok(None), // another manager made it meanwhile
        Err(e) => Err(e),
    }
}

/// A user by name.
pub async fn user_by_name(store: &Store, name: &str) -> Result<Option<User>> {
    Ok(store
        .fetch_optional("SELECT * FROM users WHERE name = ?", &[name.into()])
        .await?
        .map(|r| User::from_row(&r)))
}

/// A user by ID.
pub async fn user_by_id(store: &Store, id: i64) -> Result<Option<User>> {
    Ok(store
        .fetch_optional("SELECT * FROM users WHERE id = ?", &[id.into()])
        .await?
        .map(|r| User::from_row(&r)))
}

/// What a personal access token allows, when it is known.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub user_id: i64,
    pub scopes: Vec<String>,
    pub active: bool,
    pub expired: bool,
}

/// Looks a presented token up by its hash.
pub async fn token_grant(store: &Store, token: &str) -> Result<Option<TokenGrant>> {
    let Some(row) = store
        .fetch_optional(
            "SELECT * FROM personal_access_tokens WHERE token_hash = ?",
            &[token_hash(token).into()],
        )
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(TokenGrant {
        user_id: row.int("user_id"),
        scopes: serde_json::from_str(&row.text("scopes")).unwrap_or_default(),
        active: row.text("state") == "active",
        expired: row.int("expired_at") != 0 && row.int("expired_at") < now(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens() {
        let hash = hash_password("correct horse");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
        assert!(!verify_password("x", "not a hash"));
        assert_ne!(hash_password("same"), hash_password("same"), "salted");
        let t = random_token();
        assert_eq!(t.len(), 64);
        assert_ne!(token_hash(&t), t);
    }
}
