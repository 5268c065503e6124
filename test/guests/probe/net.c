/*
 * virtio-net driver + a tiny IPv4 stack (probe.test=net, DeviceID 1), everything in ring 3 (in_user):
 * virtio init, the poll loop, ARP, IPv4, ICMP echo, UDP. Features: VERSION_1 + MAC (+ STATUS if offered);
 * no offloads, no MRG_RXBUF, so every buffer starts with a 12-byte virtio_net_hdr. Queue 0 RX (kept
 * full of 2 KiB buffers, one descriptor each), queue 1 TX (header + frame in one descriptor).
 *
 * Modes (probe.net.mode=): ping (answer ARP + ICMP echo), tx (UDP datagrams to host:port as fast as the
 * TX queue allows), rx (count UDP datagrams from the host, check seq/pattern), echo (UDP echo server).
 * Everything the device writes is validated (used ids, lengths, the vnet header, frame contents:
 * IPv4 header checksum, lengths, ICMP/UDP checksums): a violation prints "PROBE error net_<what>".
 *
 * UDP payload (tx and rx): bytes 0..3 = seq (big endian), byte i ≥ 4 = (seq + i) & 0xff.
 */
#include "virtio.h"

#define VNET_F_MAC    5
#define VNET_F_STATUS 16
#define VNET_S_LINK_UP 1
#define VNET_HDR_F_NEEDS_CSUM 1
#define VNET_HDR_F_DATA_VALID 2
#define HDR 12                          /* virtio_net_hdr with num_buffers (VERSION_1) */
#define QSIZE 128
#define BUF 2048                        /* per descriptor: 12 + a 1514-byte frame fits */
#define ETH 14
#define MAX_PAYLOAD 1472                /* 1500 - 20 (IPv4) - 8 (UDP) */
#define RX_MAX_COUNT (1u << 22)         /* seq bitmap size for mode=rx */

static u8 rxq_page[4096] __attribute__((aligned(4096)));
static u8 txq_page[4096] __attribute__((aligned(4096)));
static u8 rxbuf[QSIZE][BUF] __attribute__((aligned(4096)));
static u8 txbuf[QSIZE][BUF] __attribute__((aligned(4096)));
static u8 rx_posted[QSIZE], tx_busy[QSIZE];
static u16 tx_free[QSIZE];
static u32 tx_nfree;
static u8 seen[RX_MAX_COUNT / 8];

static struct virtio_dev net = { .name = "net", .device_id = VIRTIO_ID_NET };
static struct virtq rxq, txq;

static u8 my_mac[6], host_mac[6];
static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
static u8 my_ip[4], host_ip[4];
static u32 prefix;
static int host_mac_known, link_up = 1;
static u16 port, ip_id;

enum { MODE_PING, MODE_TX, MODE_RX, MODE_ECHO };
static int mode;
static u64 count, size, secs, idle_ms, batch;
static u64 deadline;

static struct {
    u64 rx, tx, arp, arp_req, echo, udp, ignored, bad, dup, first_bad;
    u64 t_first, t_last;                /* mode rx: first and last datagram; mode tx: start and end */
    u64 received, max_seq, sent, bytes;
} st;

__attribute__((noreturn)) static void net_fail(const char *why, u64 v) { virtio_fail(&net, why, v); }

static inline u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static inline u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static inline void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static inline void put32(u8 *p, u32 v) { p[0] = (u8)(v >> 24); p[1] = (u8)(v >> 16); p[2] = (u8)(v >> 8); p[3] = (u8)v; }
static inline int eq(const u8 *a, const u8 *b, int n) { while (n--) if (*a++ != *b++) return 0; return 1; }

/* Internet checksum: one's-complement sum of big-endian 16-bit words (not yet inverted). */
static u32 csum_add(u32 sum, const u8 *p, u32 len)
{
    for (u32 i = 0; i + 1 < len; i += 2) sum += (u32)p[i] << 8 | p[i + 1];
    if (len & 1) sum += (u32)p[len - 1] << 8;
    return sum;
}
static u16 csum_fold(u32 sum) { while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16); return (u16)~sum; }
/* UDP checksum over the IPv4 pseudo header + UDP header + payload (0 becomes 0xffff). */
static u16 udp_csum(const u8 *src, const u8 *dst, const u8 *udp, u32 len)
{
    u32 s = csum_add(0, src, 4);
    s = csum_add(s, dst, 4);
    s += 17 + len;
    u16 c = csum_fold(csum_add(s, udp, len));
    return c ? c : 0xffff;
}

static void put_mac(const u8 *m)
{
    for (int i = 0; i < 6; i++) {
        char b[3] = { "0123456789abcdef"[m[i] >> 4], "0123456789abcdef"[m[i] & 15], 0 };
        if (i) puts(":");
        puts(b);
    }
}
static void put_ip(const u8 *ip) { for (int i = 0; i < 4; i++) { if (i) puts("."); putu(ip[i]); } }

/* "a.b.c.d" → ip; 0 if malformed. */
static int parse_ip(const char *s, u8 *ip)
{
    for (int i = 0; i < 4; i++) {
        int ok;
        u64 v = parse_num(s, &s, &ok);
        if (!ok || v > 255) return 0;
        ip[i] = (u8)v;
        if (i < 3 && *s++ != '.') return 0;
    }
    return *s == 0;
}

static void ip_param(const char *name, const char *dflt, u8 *ip)
{
    char buf[32];
    const char *s = param(name, buf, sizeof(buf));
    if (!s) s = dflt;
    if (!parse_ip(s, ip)) { puts("PROBE error net_bad_param "); puts(name); puts("="); puts(s); puts("\n"); finish(2); }
}

/* ---- TX ---- */
static void tx_reclaim(void)
{
    u32 id, len;
    while (vq_poll(&txq, &id, &len)) {
        if (!tx_busy[id]) net_fail("tx_used_id", id);
        if (len != 0) net_fail("tx_used_len", len);        /* nothing in a TX chain is device-writable */
        tx_busy[id] = 0;
        tx_free[tx_nfree++] = (u16)id;
    }
}

/* A free TX slot: its frame area (after the vnet header). Spins reclaiming (5 s) when all are in flight. */
static u8 *tx_get(u16 *id)
{
    if (!tx_nfree) {
        u64 end = rdtsc() + tsc_per_ms() * 5000;
        while (tx_reclaim(), !tx_nfree) {
            if (rdtsc() > end) net_fail("tx_stuck", txq.inflight);
            __asm__ volatile("pause");
        }
    }
    *id = tx_free[--tx_nfree];
    return txbuf[*id] + HDR;
}

static void tx_put(u16 id, u32 frame_len)
{
    memset(txbuf[id], 0, HDR);                            /* no offloads: flags 0, GSO_NONE */
    vq_set_desc(&txq, id, (u64)txbuf[id], HDR + frame_len, 0, 0);
    tx_busy[id] = 1;
    vq_add(&txq, id);
    st.tx++;
}

static void kick_if_wanted(struct virtq *q)
{
    if (!(q->used[0] & 1)) vq_kick(q);                    /* VIRTQ_USED_F_NO_NOTIFY clear */
}
static void tx_flush(void) { vq_publish(&txq); kick_if_wanted(&txq); }

static void eth_hdr(u8 *f, const u8 *dst, u16 type)
{
    memcpy(f, dst, 6); memcpy(f + 6, my_mac, 6); put16(f + 12, type);
}

static void ip_hdr(u8 *ip, const u8 *dst, u8 proto, u32 payload_len)
{
    ip[0] = 0x45; ip[1] = 0; put16(ip + 2, (u16)(20 + payload_len)); put16(ip + 4, ip_id++);
    put16(ip + 6, 0x4000); ip[8] = 64; ip[9] = proto; ip[10] = ip[11] = 0;
    memcpy(ip + 12, my_ip, 4); memcpy(ip + 16, dst, 4);
    put16(ip + 10, csum_fold(csum_add(0, ip, 20)));
}

static void send_arp(u16 op, const u8 *eth_dst, const u8 *tha, const u8 *tpa)
{
    u16 id;
    u8 *f = tx_get(&id);
    eth_hdr(f, eth_dst, 0x0806);
    u8 *a = f + ETH;
    put16(a, 1); put16(a + 2, 0x0800); a[4] = 6; a[5] = 4; put16(a + 6, op);
    memcpy(a + 8, my_mac, 6); memcpy(a + 14, my_ip, 4); memcpy(a + 18, tha, 6); memcpy(a + 24, tpa, 4);
    memset(a + 28, 0, 18);                                /* pad to the 60-byte minimum */
    tx_put(id, 60);
    tx_flush();
}

/* UDP datagram with payload from pl (or the seq pattern when pl is 0). Not flushed. */
static void send_udp(const u8 *mac, const u8 *dst, u16 sport, u16 dport, const u8 *pl, u32 len, u32 seq)
{
    u16 id;
    u8 *f = tx_get(&id);
    eth_hdr(f, mac, 0x0800);
    u8 *ip = f + ETH, *u = ip + 20, *p = u + 8;
    if (pl) memcpy(p, pl, len);
    else {
        put32(p, seq);
        for (u32 i = 4; i < len; i++) p[i] = (u8)(seq + i);
    }
    put16(u, sport); put16(u + 2, dport); put16(u + 4, (u16)(8 + len)); put16(u + 6, 0);
    ip_hdr(ip, dst, 17, 8 + len);
    put16(u + 6, udp_csum(my_ip, dst, u, 8 + len));
    u32 flen = ETH + 20 + 8 + len;
    if (flen < 60) { memset(f + flen, 0, 60 - flen); flen = 60; }
    tx_put(id, flen);
}

/* ---- RX ---- */
static void rx_post(u16 id)
{
    vq_set_desc(&rxq, id, (u64)rxbuf[id], BUF, VD_WRITE, 0);
    rx_posted[id] = 1;
    vq_add(&rxq, id);
}

static void handle_arp(const u8 *f, u32 len)
{
    if (len < ETH + 28) net_fail("rx_arp_short", len);
    const u8 *a = f + ETH;
    if (be16(a) != 1 || be16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4) { st.ignored++; return; }
    u16 op = be16(a + 6);
    if (eq(a + 14, host_ip, 4) && !(a[8] & 1)) { memcpy(host_mac, a + 8, 6); host_mac_known = 1; }
    if (op == 1 && eq(a + 24, my_ip, 4)) { send_arp(2, a + 8, a + 8, a + 14); st.arp++; }
}

static void handle_icmp(const u8 *f, const u8 *ip, u32 ihl, u32 tot)
{
    const u8 *ic = ip + ihl;
    u32 ilen = tot - ihl;
    if (ilen < 8) net_fail("rx_icmp_short", ilen);
    if (csum_fold(csum_add(0, ic, ilen)) != 0) net_fail("rx_icmp_csum", be16(ic + 2));
    if (ic[0] != 8 || ic[1] != 0) { st.ignored++; return; }    /* only echo requests */
    if (ilen > MAX_PAYLOAD + 8) { st.ignored++; return; }
    u16 id;
    u8 *o = tx_get(&id);
    eth_hdr(o, f + 6, 0x0800);
    u8 *oip = o + ETH, *oic = oip + 20;
    memcpy(oic, ic, ilen);
    oic[0] = 0; oic[2] = oic[3] = 0;
    put16(oic + 2, csum_fold(csum_add(0, oic, ilen)));
    ip_hdr(oip, ip + 12, 1, ilen);
    u32 flen = ETH + 20 + ilen;
    if (flen < 60) { memset(o + flen, 0, 60 - flen); flen = 60; }
    tx_put(id, flen);
    tx_flush();
    st.echo++;
}

static void handle_udp(const u8 *f, const u8 *ip, u32 ihl, u32 tot)
{
    const u8 *u = ip + ihl;
    u32 ulen = tot - ihl;
    if (ulen < 8 || be16(u + 4) != ulen) net_fail("rx_udp_len", ulen);
    if (be16(u + 6) && csum_fold(csum_add(csum_add(csum_add(17 + ulen, ip + 12, 4), ip + 16, 4), u, ulen)) != 0)
        net_fail("rx_udp_csum", be16(u + 6));
    if (be16(u + 2) != port) { st.ignored++; return; }
    st.udp++;
    const u8 *p = u + 8;
    u32 plen = ulen - 8;
    if (mode == MODE_ECHO) {
        send_udp(f + 6, ip + 12, port, be16(u), p, plen, 0);
        tx_flush();
        return;
    }
    if (mode != MODE_RX) return;
    u64 now = rdtsc();
    if (!st.received) st.t_first = now;
    st.t_last = now;
    if (plen < 4) { st.bad++; if (st.first_bad == ~0ull) st.first_bad = 0; return; }
    u32 seq = be32(p);
    int ok = 1;
    for (u32 i = 4; i < plen; i++) if (p[i] != (u8)(seq + i)) { ok = 0; break; }
    if (!ok || seq >= count) { st.bad++; if (st.first_bad == ~0ull) st.first_bad = seq; return; }
    if (seen[seq >> 3] & (1 << (seq & 7))) { st.dup++; return; }
    seen[seq >> 3] |= (u8)(1 << (seq & 7));
    st.received++;
    st.bytes += plen;
    if (seq > st.max_seq) st.max_seq = seq;
}

static void handle_ipv4(const u8 *f, u32 len)
{
    const u8 *ip = f + ETH;
    if (len < ETH + 20) net_fail("rx_ip_short", len);
    u32 ihl = (ip[0] & 15) * 4u, tot = be16(ip + 2);
    if ((ip[0] >> 4) != 4 || ihl < 20) net_fail("rx_ip_version", ip[0]);
    if (tot < ihl || ETH + tot > len) net_fail("rx_ip_len", tot);
    if (csum_fold(csum_add(0, ip, ihl)) != 0) net_fail("rx_ip_csum", be16(ip + 10));
    if (!eq(ip + 16, my_ip, 4) || (be16(ip + 6) & 0x3fff)) { st.ignored++; return; }   /* not ours, fragments */
    if (ip[9] == 1) handle_icmp(f, ip, ihl, tot);
    else if (ip[9] == 17) handle_udp(f, ip, ihl, tot);
    else st.ignored++;
}

/* Takes every used RX buffer, validates and handles it; re-posts the batch afterwards (so a buffer the
 * device reports twice is caught), with one publish + notify (the spec requires the notification unless
 * the device set VIRTQ_USED_F_NO_NOTIFY; skipping it while the device still held buffers lost frames on
 * kvmkit). */
static u16 rx_done[QSIZE];
static void rx_poll(void)
{
    u32 id, len;
    u32 n = 0;
    while (vq_poll(&rxq, &id, &len)) {
        if (!rx_posted[id]) net_fail("rx_used_id", id);
        rx_posted[id] = 0;
        rx_done[n++] = (u16)id;
        if (len < HDR + ETH || len > BUF) net_fail("rx_used_len", len);
        const u8 *b = rxbuf[id];
        if ((b[0] & ~VNET_HDR_F_DATA_VALID) || b[1] != 0) net_fail("rx_hdr", (u64)b[1] << 8 | b[0]);
        const u8 *f = b + HDR;
        u32 flen = len - HDR;
        st.rx++;
        if (eq(f, my_mac, 6) || eq(f, bcast, 6)) {
            u16 type = be16(f + 12);
            if (type == 0x0806) handle_arp(f, flen);
            else if (type == 0x0800) handle_ipv4(f, flen);
            else st.ignored++;
        } else {
            st.ignored++;                                 /* multicast (IPv6 ND, ...) or another MAC */
        }
    }
    for (u32 i = 0; i < n; i++) rx_post(rx_done[i]);
    if (n) { vq_publish(&rxq); kick_if_wanted(&rxq); }
}

static void poll_all(void) { rx_poll(); tx_reclaim(); }

/* ARP for the host until it answers (every 200 ms) or the deadline. */
static void resolve_host(void)
{
    while (!host_mac_known) {
        send_arp(1, bcast, (const u8 *)"\0\0\0\0\0\0", host_ip);
        st.arp_req++;
        u64 next = rdtsc() + tsc_per_ms() * 200;
        while (!host_mac_known && rdtsc() < next) { poll_all(); __asm__ volatile("pause"); }
        if (!host_mac_known && rdtsc() > deadline) net_fail("arp_timeout", st.arp_req);
    }
}

static void run_tx(void)
{
    resolve_host();
    /* Let the ARP exchange's frames drain, then time the datagrams alone. */
    st.t_first = rdtsc();
    u64 seq = 0;
    while (seq < count) {
        if (rdtsc() > deadline) net_fail("tx_timeout", seq);
        poll_all();
        int n = 0;
        /* Refill in batches (one notification each) once `batch` slots are free or the queue drained. */
        if (tx_nfree < batch && txq.inflight) { __asm__ volatile("pause"); continue; }
        while (seq < count && tx_nfree) {
            send_udp(host_mac, host_ip, port, port, 0, (u32)size, (u32)seq);
            seq++; n++;
        }
        if (n) tx_flush();
    }
    while (txq.inflight) {
        tx_reclaim();
        if (rdtsc() > deadline) net_fail("tx_timeout", txq.inflight);
    }
    st.t_last = rdtsc();
    st.sent = seq;
    st.bytes = seq * size;
}

static u64 net_main(u64 unused)
{
    (void)unused;
    char m[16];
    if (!param("net.mode", m, sizeof(m))) memcpy(m, "ping", 5);
    if (streq(m, "ping")) mode = MODE_PING;
    else if (streq(m, "tx")) mode = MODE_TX;
    else if (streq(m, "rx")) mode = MODE_RX;
    else if (streq(m, "echo")) mode = MODE_ECHO;
    else { puts("PROBE error net_bad_param net.mode="); puts(m); puts("\n"); finish(2); }
    ip_param("net.ip", "10.0.2.15", my_ip);
    ip_param("net.host", "10.0.2.2", host_ip);
    prefix = (u32)param_u64("net.mask", 24);
    count = param_u64("net.count", mode == MODE_PING || mode == MODE_ECHO ? 0 : 1000);
    size = param_u64("net.size", 64);
    secs = param_u64("net.secs", 10);
    idle_ms = param_u64("net.idle_ms", 2000);
    port = (u16)param_u64("net.port", 5000);
    batch = param_u64("net.batch", 32);
    if (prefix == 0 || prefix > 30) net_fail("bad_param_mask", prefix);
    u32 mask = ~0u << (32 - prefix);
    if ((be32(my_ip) & mask) != (be32(host_ip) & mask) || eq(my_ip, host_ip, 4)) net_fail("host_not_on_link", be32(host_ip));
    if (size < 4 || size > MAX_PAYLOAD) net_fail("bad_param_size", size);
    if (mode == MODE_RX && (count == 0 || count > RX_MAX_COUNT)) net_fail("bad_param_count", count);
    if (mode == MODE_TX && count == 0) net_fail("bad_param_count", count);
    if (secs == 0) secs = 10;
    if (batch == 0 || batch > QSIZE) batch = 32;

    virtio_begin(&net, 1ull << VNET_F_MAC | 1ull << VNET_F_STATUS);
    virtio_queue_setup(&net, &rxq, 0, rxq_page, QSIZE);
    virtio_queue_setup(&net, &txq, 1, txq_page, QSIZE);
    if (net.drv_feat & (1ull << VNET_F_MAC)) {
        u32 gen;
        do {
            gen = vm_r(&net, VM_CONFIG_GEN);
            for (int i = 0; i < 6; i++) my_mac[i] = virtio_cfg8(&net, (u32)i);
        } while (gen != vm_r(&net, VM_CONFIG_GEN));
        if (my_mac[0] & 1) net_fail("config_mac_multicast", my_mac[0]);
    } else {
        const u8 dflt[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
        memcpy(my_mac, dflt, 6);
    }
    if (net.drv_feat & (1ull << VNET_F_STATUS)) link_up = virtio_cfg16(&net, 6) & VNET_S_LINK_UP;
    virtio_driver_ok(&net);
    vq_no_interrupt(&rxq, 1);
    vq_no_interrupt(&txq, 1);
    for (u16 i = 0; i < rxq.num; i++) rx_post(i);
    vq_publish(&rxq);
    vq_kick(&rxq);
    for (u16 i = 0; i < txq.num; i++) tx_free[tx_nfree++] = (u16)(txq.num - 1 - i);
    puts("PROBE net_dev"); kvx("addr", net.base); kvx("size", net.size); kv("irq", net.irq);
    kvx("features", net.dev_feat); kvx("driver_features", net.drv_feat); puts(" mac="); put_mac(my_mac);
    kv("link", (u64)link_up); kv("rxq", rxq.num); kv("txq", txq.num); kv("queue_num_max", rxq.num_max);
    puts(" ip="); put_ip(my_ip); puts(" host="); put_ip(host_ip); puts("\n");

    st.first_bad = ~0ull;
    u64 t0 = rdtsc();
    deadline = t0 + tsc_per_ms() * 1000 * secs;
    int ok = 1;
    if (mode == MODE_TX) {
        run_tx();
    } else {
        for (;;) {
            poll_all();
            u64 now = rdtsc();
            if (now > deadline) break;
            if (mode == MODE_PING && count && st.echo >= count) break;
            if (mode == MODE_ECHO && count && st.udp >= count) break;
            if (mode == MODE_RX && (st.received + st.bad >= count ||
                                    (st.received && now - st.t_last > tsc_per_ms() * idle_ms))) break;
            __asm__ volatile("pause");
        }
        /* Replies still in flight: wait for them to leave (1 s). */
        u64 end = rdtsc() + tsc_per_ms() * 1000;
        while (txq.inflight && rdtsc() < end) tx_reclaim();
        if (txq.inflight) net_fail("tx_stuck", txq.inflight);
    }

    puts("PROBE net mode="); puts(m);
    if (mode == MODE_TX || mode == MODE_RX) {
        u64 pkts = mode == MODE_TX ? st.sent : st.received;
        u64 cyc = st.t_last - st.t_first;
        kv("count", count);
        if (mode == MODE_TX) { kv("size", size); kv("batch", batch); kv("sent", st.sent); }
        else {
            u64 lost = st.received < count ? count - st.received : 0;
            kv("received", st.received); kv("lost", lost); kv("dup", st.dup); kv("bad", st.bad);
            if (st.bad) kv("first_bad_seq", st.first_bad);
            ok = st.received == count && st.bad == 0 && st.dup == 0;
        }
        kv("bytes", st.bytes); kv("cycles", cyc); kv("cycles_per_pkt", pkts ? cyc / pkts : 0);
        kv("pps", cyc && tsc_khz ? pkts * tsc_khz * 1000 / cyc : 0);
    } else if (mode == MODE_PING) {
        ok = count ? st.echo >= count : 1;
    } else {
        kv("echoed", st.udp);
        ok = count ? st.udp >= count : 1;
    }
    kv("rx", st.rx); kv("tx", st.tx); kv("echo", st.echo); kv("arp", st.arp); kv("arp_req", st.arp_req);
    kv("udp", st.udp); kv("ignored", st.ignored); kv("link", (u64)link_up); kv("tsc_khz", tsc_khz); kv("ok", (u64)ok);
    puts("\n");
    virtio_reset(&net);
    finish(ok ? 0 : 1);
}

void test_net(void)
{
    u64 r = in_user(net_main, 0);
    if (r == USER_FAULTED) { puts("PROBE error net_ring3_fault"); kv("vector", user_fault_vector); puts("\n"); finish(1); }
    finish(3);
}
