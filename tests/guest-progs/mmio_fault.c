/*
 * Runs, as an unprivileged ring-3 process of a Linux guest, an instruction that KVM's emulator
 * lacks with a memory operand on a device page (a PCI memory BAR mapped through sysfs). On a real
 * CPU it would just read the device; where KVM must emulate the access (an MMIO page) and cannot,
 * the VMM must fault the process (#UD -> SIGILL), never end the VM.
 *
 * Usage: mmio_fault pshufb|popcnt. Prints the BAR it mapped, then runs the instruction; if the
 * instruction returns, prints "mmio_fault: survived" and exits 0.
 * Built by tests/tests/linux_mmio_fault.rs with `gcc -static -O1`.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* The first PCI memory BAR that sysfs lets us map (I/O BARs refuse mmap). */
static volatile unsigned char *map_bar(char *path, size_t len)
{
	DIR *dir = opendir("/sys/bus/pci/devices");
	struct dirent *entry;
	if (!dir)
		return NULL;
	while ((entry = readdir(dir))) {
		if (entry->d_name[0] == '.')
			continue;
		for (int bar = 0; bar < 6; bar++) {
			snprintf(path, len, "/sys/bus/pci/devices/%s/resource%d", entry->d_name, bar);
			int fd = open(path, O_RDONLY);
			if (fd < 0)
				continue;
			void *page = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
			close(fd);
			if (page != MAP_FAILED) {
				closedir(dir);
				return page;
			}
		}
	}
	closedir(dir);
	return NULL;
}

int main(int argc, char **argv)
{
	char path[300];
	volatile unsigned char *bar = map_bar(path, sizeof(path));
	if (argc != 2 || !bar) {
		printf("mmio_fault: %s\n", bar ? "usage: mmio_fault pshufb|popcnt" : "no PCI memory BAR to map");
		return 2;
	}
	/* Ring 3 without privileges, as any user of the guest. */
	if (setgid(65534) != 0 || setuid(65534) != 0) {
		printf("mmio_fault: cannot drop privileges\n");
		return 2;
	}
	printf("mmio_fault: mapped %s as uid %d, running %s on it\n", path, (int)getuid(), argv[1]);
	fflush(stdout);
	if (strcmp(argv[1], "pshufb") == 0) {
		/* SSSE3: KVM's emulator has no pshufb, the VMM's fallback neither. */
		__asm__ volatile("pshufb (%0), %%xmm0" : : "r"(bar) : "xmm0", "memory");
	} else if (strcmp(argv[1], "popcnt") == 0) {
		/* KVM's emulator lacks popcnt; the fallback has it but only for guest RAM. */
		unsigned long out;
		__asm__ volatile("popcnt (%1), %0" : "=r"(out) : "r"(bar) : "memory");
	} else {
		printf("mmio_fault: unknown instruction %s\n", argv[1]);
		return 2;
	}
	printf("mmio_fault: survived\n");
	return 0;
}
