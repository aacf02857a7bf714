// sseload: bench/connect_rate.py's SSE client role (`Client(..., go=True)`, density.py `--client go`)
// compiled, so that 100,000 subscribers read on the proxy's own cores cost it less CPU than Python's.
// Standard library only: build with `GO111MODULE=off go build -o sseload .`.
//
// Its argument is the role's JSON (host, port, source, n, inflight, path, spread, first, timeout,
// deadline, hold, record, out); it speaks the role's lines: prints {"ready": n}, waits for "go", opens n
// connections from `source` (`inflight` at once), each `GET path` up to its 200, prints {"connected",
// "wall"}; then, holding them, answers "quiet" (leave every socket unread until the next command),
// "read K" (once every connection has read K stamped events, or after `timeout` s: {"read", "short"})
// and ends at "stop [K]" (the same wait), writing {"took", "failed", "wall", "records", "counts"} to
// `out` and printing {"result": out}. Records are [read at, latency when read, latency when the bytes
// reached the socket] per `"ts":T,` stamp, the last from the kernel's receive time (SO_TIMESTAMPNS).
package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type args struct {
	Host     string  `json:"host"`
	Port     int     `json:"port"`
	Source   string  `json:"source"`
	N        int     `json:"n"`
	Inflight int     `json:"inflight"`
	Path     string  `json:"path"`
	Spread   int     `json:"spread"`
	First    int     `json:"first"`
	Timeout  float64 `json:"timeout"`
	Deadline float64 `json:"deadline"`
	Out      string  `json:"out"`
}

const soTimestampNS = 35       // SO_TIMESTAMPNS = SCM_TIMESTAMPNS on Linux
const ipBindAddressNoPort = 24 // IP_BIND_ADDRESS_NO_PORT
var stamp = []byte(`"ts":`)

type conn struct {
	c     *net.TCPConn
	count int64 // stamped events read (atomic)
	ok    bool
}

var (
	mu      sync.Mutex
	records [][3]float64
	gate    = make(chan struct{}) // closed while reading is allowed; replaced by "quiet"
	gateMu  sync.RWMutex
	quiet   int32 // 1: leave the sockets unread (atomic)
)

func now() float64 { return float64(time.Now().UnixNano()) / 1e9 }

func emit(v interface{}) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func currentGate() chan struct{} {
	gateMu.RLock()
	defer gateMu.RUnlock()
	return gate
}

// read reads `c` until it ends, recording stamps with the kernel's receive time.
func read(k *conn, raw syscall.RawConn, tail []byte) {
	buf := make([]byte, 65536)
	oob := make([]byte, syscall.CmsgSpace(16))
	for {
		<-currentGate() // quiet: wait until reading is allowed again
		var n, oobn int
		var rerr error
		parked := false
		err := raw.Read(func(fd uintptr) bool {
			if atomic.LoadInt32(&quiet) == 1 { // woken while quiet: leave the bytes (and their time) in the socket
				parked = true
				return true
			}
			n, oobn, _, _, rerr = syscall.Recvmsg(int(fd), buf, oob, 0)
			return rerr != syscall.EAGAIN
		})
		if parked {
			continue
		}
		if err != nil || rerr != nil || n == 0 {
			return
		}
		at := now()
		arrived := at
		if msgs, err := syscall.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, m := range msgs {
				if m.Header.Level == syscall.SOL_SOCKET && m.Header.Type == soTimestampNS && len(m.Data) >= 16 {
					sec := int64(binary.LittleEndian.Uint64(m.Data[0:8]))
					nsec := int64(binary.LittleEndian.Uint64(m.Data[8:16]))
					arrived = float64(sec) + float64(nsec)/1e9
				}
			}
		}
		data := append(tail, buf[:n]...)
		start := 0
		var mine [][3]float64
		for {
			i := bytes.Index(data[start:], stamp)
			if i < 0 {
				break
			}
			i += start
			j := bytes.IndexByte(data[i:], ',')
			if j < 0 {
				break
			}
			j += i
			if ts, err := strconv.ParseFloat(string(data[i+len(stamp):j]), 64); err == nil {
				mine = append(mine, [3]float64{at, at - ts, arrived - ts})
				atomic.AddInt64(&k.count, 1)
			}
			start = j
		}
		rest := data[start:]
		if len(rest) > 64 {
			rest = rest[len(rest)-64:]
		}
		tail = append([]byte(nil), rest...)
		if len(mine) > 0 {
			mu.Lock()
			records = append(records, mine...)
			mu.Unlock()
		}
	}
}

func main() {
	var a args
	if err := json.Unmarshal([]byte(os.Args[1]), &a); err != nil {
		fmt.Fprintln(os.Stderr, "sseload: the argument must be the role's JSON:", err)
		os.Exit(2)
	}
	stdin := bufio.NewReader(os.Stdin)
	close(gate)
	emit(map[string]int{"ready": a.N})
	stdin.ReadString('\n') // "go"
	started := time.Now()
	conns := make([]*conn, a.N)
	var took []float64
	failed := map[string]int{}
	var tookMu sync.Mutex
	sem := make(chan struct{}, a.Inflight)
	var wg sync.WaitGroup
	dialer := net.Dialer{
		LocalAddr: &net.TCPAddr{IP: net.ParseIP(a.Source)},
		Timeout:   time.Duration(a.Timeout * float64(time.Second)),
		Control: func(network, address string, c syscall.RawConn) error {
			return c.Control(func(fd uintptr) {
				syscall.SetsockoptInt(int(fd), syscall.SOL_IP, ipBindAddressNoPort, 1)
				syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, soTimestampNS, 1)
			})
		},
	}
	fail := func(kind string) {
		tookMu.Lock()
		failed[kind]++
		tookMu.Unlock()
	}
	for i := 0; i < a.N; i++ {
		sem <- struct{}{}
		if a.Deadline > 0 && time.Since(started).Seconds() > a.Deadline {
			<-sem
			fail("not_begun_by_deadline")
			continue
		}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			number := a.First + i
			if a.Spread > 0 {
				number %= a.Spread
			}
			path := strings.ReplaceAll(a.Path, "{i}", strconv.Itoa(number))
			began := time.Now()
			c, err := dialer.Dial("tcp", net.JoinHostPort(a.Host, strconv.Itoa(a.Port)))
			if err != nil {
				fail("ConnectionError")
				return
			}
			tc := c.(*net.TCPConn)
			tc.SetDeadline(began.Add(time.Duration(a.Timeout * float64(time.Second))))
			if _, err := tc.Write([]byte("GET " + path + " HTTP/1.1\r\nHost: bench\r\n\r\n")); err != nil {
				fail("ConnectionError")
				tc.Close()
				return
			}
			head := make([]byte, 0, 1024)
			buf := make([]byte, 4096)
			for !bytes.Contains(head, []byte("\r\n")) {
				n, err := tc.Read(buf)
				if err != nil {
					fail("TimeoutError")
					tc.Close()
					return
				}
				head = append(head, buf[:n]...)
			}
			line := head[:bytes.Index(head, []byte("\r\n"))]
			if fields := bytes.Fields(line); len(fields) < 2 || string(fields[1]) != "200" {
				fail("RuntimeError")
				tc.Close()
				return
			}
			tc.SetDeadline(time.Time{})
			tookMu.Lock()
			took = append(took, time.Since(began).Seconds())
			tookMu.Unlock()
			k := &conn{c: tc, ok: true}
			conns[i] = k
			raw, _ := tc.SyscallConn()
			go read(k, raw, head) // the head may hold the first events already
		}(i)
	}
	wg.Wait()
	wall := time.Since(started).Seconds()
	emit(map[string]interface{}{"connected": len(took), "wall": wall})
	waitFor := func(k int64) int {
		deadline := time.Now().Add(time.Duration(a.Timeout * float64(time.Second)))
		for {
			short := 0
			for _, c := range conns {
				if c != nil && atomic.LoadInt64(&c.count) < k {
					short++
				}
			}
			if short == 0 || time.Now().After(deadline) {
				return short
			}
			time.Sleep(50 * time.Millisecond) // polled: the readers run meanwhile
		}
	}
	for {
		line, err := stdin.ReadString('\n')
		words := strings.Fields(line)
		if err != nil || len(words) == 0 {
			words = []string{"stop"}
		}
		if words[0] == "quiet" {
			gateMu.Lock()
			gate = make(chan struct{})
			atomic.StoreInt32(&quiet, 1)
			gateMu.Unlock()
			emit(map[string]int{"quiet": len(conns)})
			continue
		}
		gateMu.Lock()
		atomic.StoreInt32(&quiet, 0)
		select {
		case <-gate:
		default:
			close(gate)
		}
		gateMu.Unlock()
		short, k := 0, int64(0)
		if len(words) > 1 {
			k, _ = strconv.ParseInt(words[1], 10, 64)
			short = waitFor(k)
		}
		if words[0] == "read" {
			emit(map[string]interface{}{"read": k, "short": short})
			continue
		}
		break
	}
	counts := map[string]int64{}
	for i, c := range conns {
		if c != nil {
			counts[strconv.Itoa(a.First+i)] = atomic.LoadInt64(&c.count)
			c.c.Close()
		}
	}
	mu.Lock()
	out, _ := json.Marshal(map[string]interface{}{"took": took, "failed": failed, "wall": wall,
		"records": records, "counts": counts})
	mu.Unlock()
	os.WriteFile(a.Out, out, 0o644)
	emit(map[string]string{"result": a.Out})
}
