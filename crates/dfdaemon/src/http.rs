//! Auxiliary HTTP servers: Prometheus metrics and health.

use crate::metrics::Metrics;
use axum::routing::get;
use std::sync::Arc;
use tokio::net::TcpListener;

/// `GET /metrics` in the Prometheus text format.
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    metrics.render(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}

/// `GET /healthy` (and `/health`) answers 200 while the daemon serves.
pub async fn serve_health(listener: TcpListener) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/healthy", get(|| async { "OK" }))
        .route("/health", get(|| async { "OK" }));
    axum::serve(listener, app).await
}
