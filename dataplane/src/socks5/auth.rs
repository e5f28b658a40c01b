//! RFC 1929 username/password for the SOCKS5 listener, plugged into fast-socks5's method
//! negotiation as our own `AuthMethod` so the replies follow `socks5.md` §2 exactly.

use fast_socks5::server::{AuthMethod, AuthMethodSuccessState};
use portcullis::secret::constant_time_eq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The configured credentials.
#[derive(Clone)]
pub struct Credentials {
    /// `network.socks_username`.
    pub username: String,
    /// Content of `network.socks_password_file` (trimmed).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials { .. }")
    }
}

/// Method `0x02`, checked against one set of credentials.
pub struct PasswordMethod<'a>(pub &'a Credentials);

/// The socket after `0x02` was chosen, before the sub-negotiation.
pub struct PasswordStarted<'a, T> {
    inner: T,
    creds: &'a Credentials,
}

/// The socket after a successful sub-negotiation.
pub struct PasswordDone<T>(T);

impl<T> AuthMethodSuccessState<T> for PasswordDone<T> {
    fn into_inner(self) -> T {
        self.0
    }
}

impl<'a, T> AuthMethod<T> for &PasswordMethod<'a> {
    type StartingState = PasswordStarted<'a, T>;

    fn method_id(self) -> u8 {
        0x02
    }

    fn new(self, inner: T) -> Self::StartingState {
        PasswordStarted {
            inner,
            creds: self.0,
        }
    }
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> PasswordStarted<'_, T> {
    /// Reads `VER ULEN UNAME PLEN PASSWD`; answers `01 00` on a match, else `01 01` and fails.
    pub async fn verify(mut self) -> Result<PasswordDone<T>, ()> {
        let ok = self.read_and_compare().await.unwrap_or(false);
        if ok {
            self.inner.write_all(&[0x01, 0x00]).await.map_err(|_| ())?;
            Ok(PasswordDone(self.inner))
        } else {
            let _ = self.inner.write_all(&[0x01, 0x01]).await;
            Err(())
        }
    }

    async fn read_and_compare(&mut self) -> std::io::Result<bool> {
        let mut head = [0u8; 2];
        self.inner.read_exact(&mut head).await?;
        let [version, ulen] = head;
        if version != 0x01 || ulen == 0 {
            return Ok(false);
        }
        let mut user = vec![0u8; ulen as usize];
        self.inner.read_exact(&mut user).await?;
        let mut plen = [0u8; 1];
        self.inner.read_exact(&mut plen).await?;
        if plen[0] == 0 {
            return Ok(false);
        }
        let mut pass = vec![0u8; plen[0] as usize];
        self.inner.read_exact(&mut pass).await?;
        // Both compared in full, constant time, so timing tells nothing about which was wrong.
        let user_ok = constant_time_eq(&user, self.creds.username.as_bytes());
        let pass_ok = constant_time_eq(&pass, self.creds.password.as_bytes());
        Ok(user_ok & pass_ok)
    }
}
