/*
 * kvm-selftest: a deterministic smoke test of /dev/kvm, run by
 * `scripts/kvm-sandbox --self-test` (inside the sandbox in nested mode).
 *
 * It creates a VM with one vCPU in real mode and 64 KiB of RAM and runs:
 *   0x1000: mov al,0x41; out 0x10,al      -> KVM_EXIT_IO  port 0x10 = 0x41
 *           int 0x21                      -> software interrupt via the IVT
 *   0x1200: mov al,0x42; out 0x11,al; iret -> KVM_EXIT_IO port 0x11 = 0x42
 *           ud2                           -> #UD exception via the IVT
 *   0x1100: mov al,0x43; out 0x12,al      -> KVM_EXIT_IO  port 0x12 = 0x43
 *           mov ecx,N; l: dec ecx; jnz l  -> 2*N instructions, timed
 *           mov al,0x44; out 0x13,al      -> KVM_EXIT_IO  port 0x13 = 0x44
 *           hlt                           -> KVM_EXIT_HLT
 * and also reports whether the CPU shows vmx/svm in /proc/cpuinfo. A /dev/kvm
 * without hardware virtualization under it (an emulating one) may get the
 * port I/O and hlt right but is not what the VMM's tests need, so a missing
 * vmx/svm flag is a failure too.
 *
 * Prints "kvm-selftest: PASS" and exits 0, or "kvm-selftest: FAIL: ..." and
 * exits 1. Build: cc -O2 -o kvm-selftest kvm-selftest.c
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE 0x10000
#define LOOP_ITERATIONS 5000000u /* 10 M guest instructions */
#define RUN_TIMEOUT_S 120

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void fail(const char *fmt, ...)
{
	va_list ap;

	fputs("kvm-selftest: FAIL: ", stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
	exit(1);
}

/* "vmx", "svm" or NULL, from the flags lines of /proc/cpuinfo. */
static const char *virt_flag(void)
{
	static char line[65536];
	const char *found = NULL;
	FILE *f = fopen("/proc/cpuinfo", "r");

	if (!f)
		return NULL;
	while (!found && fgets(line, sizeof(line), f)) {
		char *tok, *save = NULL;

		if (strncmp(line, "flags", 5) != 0)
			continue;
		for (tok = strtok_r(line, " \t\n", &save); tok;
		     tok = strtok_r(NULL, " \t\n", &save)) {
			if (!strcmp(tok, "vmx") || !strcmp(tok, "svm")) {
				found = !strcmp(tok, "vmx") ? "vmx" : "svm";
				break;
			}
		}
	}
	fclose(f);
	return found;
}

static void on_alarm(int sig)
{
	(void)sig; /* only interrupts KVM_RUN (EINTR) */
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static const char *exit_name(uint32_t r)
{
	switch (r) {
	case KVM_EXIT_IO: return "KVM_EXIT_IO";
	case KVM_EXIT_HLT: return "KVM_EXIT_HLT";
	case KVM_EXIT_MMIO: return "KVM_EXIT_MMIO";
	case KVM_EXIT_SHUTDOWN: return "KVM_EXIT_SHUTDOWN (triple fault)";
	case KVM_EXIT_FAIL_ENTRY: return "KVM_EXIT_FAIL_ENTRY";
	case KVM_EXIT_INTERNAL_ERROR: return "KVM_EXIT_INTERNAL_ERROR";
	default: return "other";
	}
}

static int vcpu_fd;
static struct kvm_run *run;

static void run_vcpu(const char *what)
{
	if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
		if (errno == EINTR)
			fail("KVM_RUN did not return within %d s while waiting for %s",
			     RUN_TIMEOUT_S, what);
		fail("KVM_RUN (waiting for %s): %s", what, strerror(errno));
	}
}

static void expect_out(uint16_t port, uint8_t value, const char *what)
{
	struct kvm_regs regs;

	run_vcpu(what);
	if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT &&
	    run->io.size == 1 && run->io.count == 1 && run->io.port == port &&
	    *((uint8_t *)run + run->io.data_offset) == value) {
		printf("kvm-selftest: ok: %s (out 0x%02x <- 0x%02x)\n", what, port, value);
		return;
	}
	memset(&regs, 0, sizeof(regs));
	ioctl(vcpu_fd, KVM_GET_REGS, &regs);
	if (run->exit_reason == KVM_EXIT_IO)
		fail("%s: expected out 0x%02x <- 0x%02x, got %s port 0x%x size %u value 0x%02x (rip 0x%llx)",
		     what, port, value, run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in",
		     run->io.port, run->io.size, *((uint8_t *)run + run->io.data_offset),
		     (unsigned long long)regs.rip);
	if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR)
		fail("%s: %s suberror %u (rip 0x%llx)", what, exit_name(run->exit_reason),
		     run->internal.suberror, (unsigned long long)regs.rip);
	fail("%s: expected KVM_EXIT_IO, got exit reason %u %s (rip 0x%llx)", what,
	     run->exit_reason, exit_name(run->exit_reason), (unsigned long long)regs.rip);
}

int main(void)
{
	static const uint8_t main_code[] = {
		0xb0, 0x41,       /* mov al,0x41 */
		0xe6, 0x10,       /* out 0x10,al */
		0xcd, 0x21,       /* int 0x21 */
		0x0f, 0x0b,       /* ud2 */
		0xf4,             /* hlt (not reached) */
	};
	static const uint8_t int21_handler[] = {
		0xb0, 0x42,       /* mov al,0x42 */
		0xe6, 0x11,       /* out 0x11,al */
		0xcf,             /* iret */
	};
	uint8_t ud_handler[] = {
		0xb0, 0x43,                   /* mov al,0x43 */
		0xe6, 0x12,                   /* out 0x12,al */
		0x66, 0xb9, 0, 0, 0, 0,       /* mov ecx,LOOP_ITERATIONS */
		0x66, 0x49,                   /* l: dec ecx */
		0x75, 0xfc,                   /* jnz l */
		0xb0, 0x44,                   /* mov al,0x44 */
		0xe6, 0x13,                   /* out 0x13,al */
		0xf4,                         /* hlt */
	};
	const char *flag = virt_flag();
	struct kvm_userspace_memory_region region;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct sigaction sa;
	uint32_t n = LOOP_ITERATIONS;
	uint8_t *mem;
	double t0, ms;
	int kvm, vm, api, mmap_size;

	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("kvm-selftest: cpu virtualization flag: %s\n",
	       flag ? flag : "none (no vmx/svm in /proc/cpuinfo)");

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		fail("open /dev/kvm: %s", strerror(errno));
	api = ioctl(kvm, KVM_GET_API_VERSION, 0);
	if (api != KVM_API_VERSION)
		fail("KVM_GET_API_VERSION = %d, expected %d", api, KVM_API_VERSION);
	vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		fail("KVM_CREATE_VM: %s", strerror(errno));
	/* Needed on Intel without unrestricted guest; harmless elsewhere. */
	ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL);

	mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		fail("mmap guest memory: %s", strerror(errno));
	memcpy(ud_handler + 6, &n, sizeof(n));
	memcpy(mem + 0x1000, main_code, sizeof(main_code));
	memcpy(mem + 0x1100, ud_handler, sizeof(ud_handler));
	memcpy(mem + 0x1200, int21_handler, sizeof(int21_handler));
	/* Real-mode IVT: vector -> offset:segment */
	mem[6 * 4 + 0] = 0x00; mem[6 * 4 + 1] = 0x11;       /* #UD -> 0000:1100 */
	mem[0x21 * 4 + 0] = 0x00; mem[0x21 * 4 + 1] = 0x12; /* int 0x21 -> 0000:1200 */

	memset(&region, 0, sizeof(region));
	region.slot = 0;
	region.guest_phys_addr = 0;
	region.memory_size = MEM_SIZE;
	region.userspace_addr = (uintptr_t)mem;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		fail("KVM_SET_USER_MEMORY_REGION: %s", strerror(errno));

	vcpu_fd = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu_fd < 0)
		fail("KVM_CREATE_VCPU: %s", strerror(errno));
	mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (mmap_size < (int)sizeof(*run))
		fail("KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
	run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
	if (run == MAP_FAILED)
		fail("mmap kvm_run: %s", strerror(errno));

	if (ioctl(vcpu_fd, KVM_GET_SREGS, &sregs) < 0)
		fail("KVM_GET_SREGS: %s", strerror(errno));
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	sregs.ds = sregs.es = sregs.ss = sregs.cs;
	sregs.ds.type = sregs.es.type = sregs.ss.type = 3; /* data rw, accessed */
	if (ioctl(vcpu_fd, KVM_SET_SREGS, &sregs) < 0)
		fail("KVM_SET_SREGS: %s", strerror(errno));
	memset(&regs, 0, sizeof(regs));
	regs.rip = 0x1000;
	regs.rsp = 0x8000;
	regs.rflags = 0x2;
	if (ioctl(vcpu_fd, KVM_SET_REGS, &regs) < 0)
		fail("KVM_SET_REGS: %s", strerror(errno));

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm; /* no SA_RESTART: KVM_RUN returns EINTR */
	sigaction(SIGALRM, &sa, NULL);
	alarm(RUN_TIMEOUT_S);

	expect_out(0x10, 0x41, "real-mode port I/O");
	expect_out(0x11, 0x42, "software interrupt (int 0x21) through the IVT");
	expect_out(0x12, 0x43, "exception (#UD from ud2) through the IVT");
	t0 = now_ms();
	expect_out(0x13, 0x44, "timed loop");
	ms = now_ms() - t0;
	printf("kvm-selftest: loop: %.0f M guest instructions in %.1f ms (%.0f M instructions/s)\n",
	       2.0 * LOOP_ITERATIONS / 1e6, ms, ms > 0 ? 2.0 * LOOP_ITERATIONS / 1e3 / ms : 0.0);
	run_vcpu("hlt");
	if (run->exit_reason != KVM_EXIT_HLT)
		fail("expected KVM_EXIT_HLT, got exit reason %u %s", run->exit_reason,
		     exit_name(run->exit_reason));
	printf("kvm-selftest: ok: hlt (KVM_EXIT_HLT)\n");
	alarm(0);

	if (!flag)
		fail("/dev/kvm ran the guest, but the CPU shows no vmx/svm: this /dev/kvm "
		     "is not backed by hardware virtualization (use scripts/kvm-sandbox's "
		     "nested mode)");
	printf("kvm-selftest: PASS\n");
	return 0;
}
