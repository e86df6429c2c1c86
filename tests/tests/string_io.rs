//! String port I/O (`rep outsb`, `rep insb`): KVM reports each as one exit carrying every element,
//! and the devices must see one access per element, as on hardware.

use std::time::Duration;

use integration_tests::guests::{string_port_io, STRING_IN_PREFIX, STRING_OUT_MARKER};
use integration_tests::{kvm_available, temp_file, tiny_elf, Guest};

#[test]
fn rep_outsb_prints_and_rep_insb_reads_each_byte_from_the_port() {
    if !kvm_available("rep_outsb_prints_and_rep_insb_reads_each_byte_from_the_port") {
        return;
    }
    let kernel = temp_file("string-io.elf", &tiny_elf(&string_port_io()));
    let mut guest = Guest::spawn(&["--kernel", kernel.to_str().unwrap(), "--memory", "64M"]);
    let status = guest.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "status {status}{}", guest.transcript());
    let console = guest.console();
    assert!(
        console.contains(STRING_OUT_MARKER),
        "rep outsb did not print its string{}",
        guest.transcript()
    );
    assert!(
        console.contains(&format!("{STRING_IN_PREFIX}ZZZZ\n")),
        "rep insb did not read the scratch register four times{}",
        guest.transcript()
    );
}
