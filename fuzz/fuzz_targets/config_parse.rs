//! Config parsing on arbitrary text: an error with a message, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = d7y_config::dfdaemon::Config::from_yaml(text);
    let _ = d7y_config::scheduler::Config::from_yaml(text);
    let _ = d7y_config::dynconfig::Dynconfig::from_yaml(text);
});
