//! `--help` of every command reading `TANDEM_DB` or `TANDEM_BUS` shows the
//! variable's name, never its value: a URL there may hold a password.

use std::process::Command;

#[test]
fn help_never_shows_the_values_of_tandem_db_and_tandem_bus() {
    for command in [
        &["serve", "customer", "--help"][..],
        &["events", "tail", "--help"],
        &["dead-letters", "list", "--help"],
        &["dead-letters", "redrive", "--help"],
        &["replay", "--help"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(command)
            .env("TANDEM_DB", "postgres://app:db-s3cret@db.internal/orders")
            .env("TANDEM_BUS", "nats://bus-s3cret@nats.internal:4222")
            .output()
            .expect("run tandem");
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{command:?}: {help}");
        assert!(
            help.contains("TANDEM_DB") || help.contains("TANDEM_BUS"),
            "{command:?} names neither variable: {help}"
        );
        for secret in ["db-s3cret", "bus-s3cret", "db.internal", "nats.internal"] {
            assert!(
                !help.contains(secret),
                "{command:?} --help shows {secret}: {help}"
            );
        }
    }
}
