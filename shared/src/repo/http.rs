//! The HTTP client under the object stores, and what a failed request's status means for the
//! retry policy. object_store shows a response's status only through the error variants it maps
//! (404 NotFound, 409 AlreadyExists, 412 Precondition, 304 NotModified, 401 Unauthenticated,
//! 403 PermissionDenied); every other status ends in a `Generic` error whose status type is
//! private to it. So the client object_store uses is its own reqwest client behind
//! [`ClassifyingConnector`], which turns a response retrying cannot change (another 4xx) into a
//! typed [`RefusedStatus`] that [`super::store`] finds in the error's source chain.

use futures::StreamExt;
use object_store::ClientOptions;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};

/// Most of an error response's body kept for the message (S3 puts its error code there).
const BODY_LIMIT: usize = 4 << 10;

/// Whether a response status says the request cannot succeed as made, whatever the number of
/// attempts: a 4xx other than 408 (request timeout) and 429 (too many requests), and other than
/// S3's 400 `RequestTimeout` error code (an idle upload connection the server dropped).
pub(crate) fn refused(status: u16, s3_code: Option<&str>) -> bool {
    (400..500).contains(&status) && !matches!(status, 408 | 429) && s3_code != Some("RequestTimeout")
}

/// Statuses object_store maps to an error variant of its own: passed through untouched.
fn mapped_by_object_store(status: u16) -> bool {
    matches!(status, 401 | 403 | 404 | 409 | 412)
}

/// The `<Code>` element of an S3 error response.
fn s3_error_code(body: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    Some(&text[start..start + len])
}

/// A response whose status says retrying cannot help.
#[derive(Debug, thiserror::Error)]
#[error("Server returned non-2xx status code: {status} {reason}: {body}")]
pub struct RefusedStatus {
    pub status: u16,
    pub(crate) reason: &'static str,
    pub(crate) body: String,
}

/// object_store's reqwest client, with refused statuses made [`RefusedStatus`] errors.
#[derive(Debug, Default)]
pub(crate) struct ClassifyingConnector;

impl HttpConnector for ClassifyingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(Classifying(
            ReqwestConnector::default().connect(options)?,
        )))
    }
}

#[derive(Debug)]
struct Classifying(HttpClient);

#[async_trait::async_trait]
impl HttpService for Classifying {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let response = self.0.execute(req).await?;
        let status = response.status();
        let code = status.as_u16();
        if !refused(code, None) || mapped_by_object_store(code) {
            return Ok(response);
        }
        let (parts, body) = response.into_parts();
        let mut stream = body.bytes_stream();
        let mut kept = Vec::new();
        while let Some(piece) = stream.next().await {
            let piece = piece?;
            kept.extend_from_slice(&piece[..piece.len().min(BODY_LIMIT.saturating_sub(kept.len()))]);
        }
        if !refused(code, s3_error_code(&kept)) {
            return Ok(HttpResponse::from_parts(parts, kept.into()));
        }
        Err(HttpError::new(
            HttpErrorKind::Unknown,
            RefusedStatus {
                status: code,
                reason: status.canonical_reason().unwrap_or(""),
                body: String::from_utf8_lossy(&kept).into_owned(),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_are_final_and_server_errors_are_retried() {
        for final_status in [400, 403, 405] {
            assert!(refused(final_status, None), "{final_status}");
        }
        for passing in [500, 503, 408, 429] {
            assert!(!refused(passing, None), "{passing}");
        }
        let body =
            b"<?xml version=\"1.0\"?><Error><Code>RequestTimeout</Code><Message>idle</Message></Error>";
        assert!(!refused(400, s3_error_code(body)), "400 RequestTimeout");
        assert_eq!(s3_error_code(b"connection reset by peer"), None);
    }
}
