/* Input for xen/src/sys/bindings.rs (see the command in that file's header). */
#include <xendevicemodel.h>
#include <xenforeignmemory.h>
#include <xenevtchn.h>
#include <xengnttab.h>
#include <xentoolcore.h>
#include <xencall.h>
#include <xen/hvm/ioreq.h>
#include <xen/hvm/params.h>
#include <xen/hvm/hvm_op.h>
#include <xen/memory.h>
#include <xen/sched.h>
