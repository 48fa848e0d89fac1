//! Task-ID derivation and the URL helpers behind it, on arbitrary input: never a panic,
//! and every ID derived is a well-formed task ID.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Fields split on NUL: url, tag, application, filtered params (comma separated), digest.
    let mut parts = text.split('\0');
    let url = parts.next().unwrap_or_default();
    let tag = parts.next();
    let application = parts.next();
    let filtered: Vec<String> = parts
        .next()
        .map(|p| p.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let digest = parts.next().unwrap_or_default();
    let piece_length = data.first().map(|b| (*b as u64) << 20);
    let params = d7y_types::TaskIdParams {
        url,
        piece_length,
        tag,
        application,
        filtered_query_params: &filtered,
        revision: None,
        content_for_calculating_task_id: None,
        enable_task_id_based_blob_digest: true,
    };
    if let Ok(id) = d7y_types::id::task_id(&params) {
        assert!(d7y_types::is_task_id(&id), "derived a malformed task id {id:?}");
    }
    let _ = d7y_types::id::filter_query_params(url, &filtered);
    let _ = d7y_types::id::blob_digest_encoded(url);
    let _ = digest.parse::<d7y_types::Digest>();
    if let Some(pl) = piece_length.filter(|pl| *pl > 0) {
        let len = u64::from_le_bytes(data.iter().copied().chain([0; 8]).take(8).collect::<Vec<_>>().try_into().unwrap());
        let layout = d7y_types::PieceLayout::new(len, Some(pl));
        let count = layout.piece_count();
        let _ = layout.range(count.saturating_sub(1));
        let _ = layout.range(count);
    }
    let _ = d7y_types::piece::piece_length_for(url.len() as u64 * 1_000_003);
});
