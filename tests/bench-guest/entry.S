/*
 * The bench guest's ring-0 stub: PVH entry (32-bit protected mode, paging off, EBX pointing at
 * hvm_start_info), long mode on identity page tables that map the first 4 GiB with the user bit
 * (RAM and the MMIO hole 0xc0000000-0xffffffff, the hole uncached; ring 3 adds the BARs a VMM
 * put above 4 GiB, see `map_high` in bench.c), a GDT with user segments,
 * a TSS whose I/O permission bitmap allows every port, kvmclock when the hypervisor is KVM, and
 * sysretq to ring 3 with IOPL 3 and interrupts off.
 *
 * The TSS matters on kvm-pvm: there a ring-3 `in`/`out` is checked against the TSS's I/O bitmap
 * even with IOPL 3, and the TSS a VMM sets up for a PVH entry (limit 0x67, no bitmap) makes the
 * first port access fault, which without an IDT is a triple fault.
 * Every instruction here runs in KVM's emulator on kvm-pvm hosts, so it stays short; the page
 * tables are built by the assembler, not at run time.
 */
#define MSR_EFER 0xc0000080
#define MSR_STAR 0xc0000081
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01
#define PTE_2M_USER 0x87   /* present, writable, user, 2 MiB page */
#define PTE_UNCACHED 0x18  /* PWT | PCD */
#define TSS_IOMAP 0x68     /* the I/O bitmap follows the 104-byte TSS */
#define TSS_LIMIT (TSS_IOMAP + 8192)  /* a bit per port, then the all-ones byte */

	.section .note.Xen, "a", @note
	.balign 4
	.long 4                 /* n_namesz: "Xen\0" */
	.long 8                 /* n_descsz: the entry, zero-extended to 8 bytes as in a vmlinux */
	.long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.quad pvh_entry

	.section .text.entry, "ax"
	.code32
	.globl pvh_entry
pvh_entry:
	mov %ebx, %edi                  /* hvm_start_info, the first argument of bench_main */
	lgdt gdt_descriptor
	mov %cr4, %eax
	or $0x20, %eax                  /* PAE */
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $MSR_EFER, %ecx
	rdmsr
	or $0x101, %eax                 /* LME, SCE (for sysretq) */
	wrmsr
	mov %cr0, %eax
	or $0x80000001, %eax            /* PG, PE */
	mov %eax, %cr0
	ljmp $0x08, $long_mode

	.code64
long_mode:
	mov $0x10, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	lea stack_top(%rip), %rsp
	/* kvmclock, for the TSC frequency: only where CPUID says KVM offers it. */
	mov %edi, %r12d
	mov $0x40000000, %eax
	cpuid
	cmp $0x4b4d564b, %ebx           /* "KVMK" */
	jne 1f
	cmp $0x40000001, %eax
	jb 1f
	mov $0x40000001, %eax
	cpuid
	test $0x08, %al                 /* KVM_FEATURE_CLOCKSOURCE2 */
	jz 1f
	mov $MSR_KVM_SYSTEM_TIME_NEW, %ecx
	lea kvmclock(%rip), %rax
	or $1, %eax                     /* enable */
	xor %edx, %edx
	wrmsr
1:	mov $MSR_STAR, %ecx
	xor %eax, %eax
	mov $0x00100008, %edx           /* sysret selectors from 0x10, syscall CS 0x08 */
	wrmsr
	/* The TSS descriptor's base, split as the descriptor wants it; then load TR. */
	mov $tss, %eax
	mov %ax, gdt_tss + 2
	shr $16, %eax
	mov %al, gdt_tss + 4
	mov %ah, gdt_tss + 7
	mov $0x28, %eax
	ltr %ax
	mov %r12d, %edi
	lea bench_main(%rip), %rcx
	mov $0x3002, %r11d              /* IOPL 3, interrupts off */
	sysretq

	.section .data.gdt, "aw"
	.balign 16
gdt:
	.quad 0                         /* null */
	.quad 0x00af9b000000ffff        /* 0x08: ring-0 64-bit code */
	.quad 0x00cf93000000ffff        /* 0x10: ring-0 data */
	.quad 0x00cff3000000ffff        /* 0x18: ring-3 data (sysret SS) */
	.quad 0x00affb000000ffff        /* 0x20: ring-3 64-bit code (sysret CS) */
gdt_tss:	/* 0x28: 64-bit TSS (two entries); the base is filled in at run time */
	.word TSS_LIMIT, 0
	.byte 0, 0x89, 0, 0
	.quad 0
gdt_end:
gdt_descriptor:
	.word gdt_end - gdt - 1
	.long gdt

	.section .data.pagetables, "aw"
	.balign 4096
	.globl pml4
pml4:
	.quad pdpt + 7
	.fill 511, 8, 0
pdpt:
	.quad pd + 7
	.quad pd + 0x1000 + 7
	.quad pd + 0x2000 + 7
	.quad pd + 0x3000 + 7
	.fill 508, 8, 0
pd:	/* 0-3 GiB: RAM; 3-4 GiB: the MMIO hole, uncached */
	.set page, 0
	.rept 1536
	.quad (page << 21) | PTE_2M_USER
	.set page, page + 1
	.endr
	.rept 512
	.quad (page << 21) | PTE_2M_USER | PTE_UNCACHED
	.set page, page + 1
	.endr

	.balign 16
tss:	/* struct tss (no stacks needed: nothing is delivered to ring 0), then the bitmap, all allowed */
	.fill 0x66, 1, 0
	.word TSS_IOMAP
	.fill 8192, 1, 0
	.byte 0xff

	.section .bss.stack, "aw", @nobits
	.balign 4096
	.globl kvmclock
kvmclock:
	.skip 4096
	.skip 65536
stack_top:

	.section .note.GNU-stack, "", @progbits
