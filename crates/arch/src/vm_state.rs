//! The VM-wide state KVM keeps in the kernel: the two PICs, the IO APIC, the PIT and the KVM
//! clock, as plain data.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("{what} failed: {source}")]
pub struct Error {
    what: &'static str,
    #[source]
    source: kvm_ioctls::Error,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error { what, source }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn chip(vm: &VmFd, id: u32, what: &'static str) -> Result<kvm_irqchip, Error> {
    let mut chip = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm(what))?;
    Ok(chip)
}

impl VmState {
    pub fn save(vm: &VmFd) -> Result<Self, Error> {
        Ok(Self {
            pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER, "reading the master PIC")?,
            pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE, "reading the slave PIC")?,
            ioapic: chip(vm, KVM_IRQCHIP_IOAPIC, "reading the IO APIC")?,
            pit: vm.get_pit2().map_err(kvm("reading the PIT"))?,
            clock: vm.get_clock().map_err(kvm("reading the KVM clock"))?,
        })
    }

    /// Into a VM whose irqchip and PIT exist already. The clock goes on from the saved
    /// reading: the guest's time stands still while it is not running.
    pub fn restore(&self, vm: &VmFd) -> Result<(), Error> {
        for (chip, what) in [
            (&self.pic_master, "setting the master PIC"),
            (&self.pic_slave, "setting the slave PIC"),
            (&self.ioapic, "setting the IO APIC"),
        ] {
            vm.set_irqchip(chip).map_err(kvm(what))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm("setting the PIT"))?;
        // Only the clock's value is handed back: the flags and host times describe the host
        // it was read on.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm("setting the KVM clock"))?;
        Ok(())
    }
}
