//! The bus conformance suite (`tandem_testkit::conformance`) against NATS
//! JetStream; every test has a subject prefix (namespace) of its own.

mod common;

use common::fresh_nats;

tandem_testkit::bus_conformance!(nats, fresh_nats());
