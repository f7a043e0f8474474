//! A query request as each door reads it: the HTTP API's JSON body (for
//! each question), the local socket's JSON order, and a command line (words
//! separated by NUL bytes). Whatever a door accepts becomes a request, and
//! its question is parsed as the desk parses it before answering. Nothing
//! may panic: a bad request is an error.
#![no_main]
use clap::Parser as _;
use icr::{
    cli::{
        args::{Cli, Command, QueryCommand},
        commands,
    },
    query::{Question, Request},
    serve::{control, http},
};
use libfuzzer_sys::fuzz_target;

fn check(request: &Request) {
    if let Ok(question) = Question::of(&request.ask) {
        let _ = question.window();
    }
    // What the audit log would keep of it.
    let _ = request.ask.parameters();
}

fuzz_target!(|data: &[u8]| {
    for kind in ["resolve", "services", "accessed"] {
        if let Ok(request) = http::request_of(kind, "fuzz", data) {
            check(&request);
        }
    }
    if let Ok(control::Order::Query(request)) = serde_json::from_slice::<control::Order>(data) {
        check(&request);
    }
    let words = data.split(|byte| *byte == 0).map(|word| String::from_utf8_lossy(word).into_owned());
    let argv: Vec<String> = ["icr".to_string(), "query".to_string()].into_iter().chain(words).collect();
    let Ok(Cli { command: Command::Query(query) }) = Cli::try_parse_from(argv) else { return };
    // A services file is a path on this machine: not read while fuzzing.
    if matches!(&query, QueryCommand::Accessed { services_file: Some(_), .. }) {
        return;
    }
    if let Ok(request) = commands::query_request(&query) {
        check(&request);
    }
});
