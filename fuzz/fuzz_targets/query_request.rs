//! A query request as each door parses it: the HTTP API's JSON body (for
//! each question), the query socket's JSON line, and a command line (words
//! separated by NUL bytes); whatever clap accepts is then parsed into a
//! typed question, as before it is authorised. Nothing may panic: a bad
//! request is an error.
#![no_main]
use clap::Parser as _;
use icr::serve::cli::{Cli, Command, QueryCommand};
use libfuzzer_sys::fuzz_target;

fn check(argv: Vec<String>) {
    let Ok(Cli { command: Command::Query(query) }) = Cli::try_parse_from(argv) else { return };
    // A services file is a path on this machine: not read while fuzzing.
    if matches!(&query, QueryCommand::Accessed { services_file: Some(_), .. }) {
        return;
    }
    if let Ok(question) = icr::serve::commands::parse_question(&query) {
        let (from, to) = question.window();
        assert!(question.purpose() as u8 >= 1);
        let _ = (from, to);
    }
}

fuzz_target!(|data: &[u8]| {
    let db = std::path::Path::new("/var/lib/icr-fuzz");
    for kind in ["resolve", "services", "accessed"] {
        let params = icr::serve::http::allowed(kind).expect("a question");
        if let Ok(argv) = icr::serve::http::request_argv(kind, params, "fuzz", db, None, data) {
            check(argv);
        }
    }
    if let Ok(request) = serde_json::from_slice::<icr::serve::control::Request>(data) {
        check(request.argv);
    }
    let words = data.split(|byte| *byte == 0).map(|word| String::from_utf8_lossy(word).into_owned());
    check(["icr".to_string(), "query".to_string()].into_iter().chain(words).collect());
});
