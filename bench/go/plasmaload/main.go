// plasmaload: plasma's `proto.StreamService/Events` read by grpc-go, as plasma's Go users have it,
// for bench/dataplane.py (`--client go`). Messages are passed as raw bytes (a codec named "proto"),
// so the figures are grpc-go's transport (HTTP/2, flow control, BDP windows), not protobuf decoding.
//
// It opens -streams streams, -per-conn on each connection, subscribes each to -topic, prints
// {"connected": N} once every stream is open, reads for -seconds, and prints
// {"result": {"events": .., "latencies": [..], "read_latencies": [..], "streams_ended": .., "cpu_seconds": ..,
// "read_seconds": ..}}: latencies (seconds) from the `"ts":T,` stamps in events on the connections of the
// first -sample streams, to when the event reached the client's socket (`latencies`: the kernel's receive
// time, SO_TIMESTAMPNS, of the bytes that held it, read from the connection's socket with recvmsg beneath
// grpc-go) and to when grpc-go handed it to the application (`read_latencies`: later by however long
// grpc-go and the Go scheduler took, and by how long this process waited for a CPU), and the CPU seconds
// the client spent over its -seconds of reading.
//
// Build offline with Debian's packages (golang-go, golang-google-grpc-dev):
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build -o plasmaload .
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append((*(v.(*[]byte)))[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// request: proto.Request{Events: [EventType{type: topic}]}, encoded by hand.
func request(topic string) []byte {
	eventType := append([]byte{0x0a, byte(len(topic))}, topic...)
	return append([]byte{0x0a, byte(len(eventType))}, eventType...)
}

var stamp = []byte(`"ts":`)

// latencies appends now - T for every `"ts":T,` in data; also returns where the last one ended.
func latencies(data []byte, now float64, out []float64) ([]float64, int) {
	end := 0
	for {
		i := bytes.Index(data[end:], stamp)
		if i < 0 {
			return out, end
		}
		i += end + len(stamp)
		j := bytes.IndexByte(data[i:], ',')
		if j < 0 {
			return out, end
		}
		if ts, err := strconv.ParseFloat(string(bytes.TrimSpace(data[i:i+j])), 64); err == nil {
			out = append(out, now-ts)
		}
		end = i + j
	}
}

const soTimestampNS = 35 // SO_TIMESTAMPNS = SCM_TIMESTAMPNS on Linux

// stampedConn is a client connection read with recvmsg, recording for every stamp in what it reads the
// kernel's receive time less the stamp: when the event reached this socket, however late grpc-go (or
// this process, waiting for a CPU) gets to it. HTTP/2 framing between events does not matter: a stamp
// is never cut by a frame header (the proxy frames whole messages), and one cut by a read is kept whole
// in `tail`.
type stampedConn struct {
	*net.TCPConn
	raw  syscall.RawConn
	oob  []byte
	tail []byte
	mu   sync.Mutex
	lat  []float64
}

func (c *stampedConn) Read(b []byte) (int, error) {
	var n, oobn int
	var rerr error
	if err := c.raw.Read(func(fd uintptr) bool {
		n, oobn, _, _, rerr = syscall.Recvmsg(int(fd), b, c.oob, 0)
		return rerr != syscall.EAGAIN
	}); err != nil {
		return 0, err
	}
	if rerr != nil {
		return 0, rerr
	}
	if n == 0 {
		return 0, io.EOF
	}
	arrived := float64(time.Now().UnixNano()) / 1e9 // (if the kernel gave no time)
	if msgs, err := syscall.ParseSocketControlMessage(c.oob[:oobn]); err == nil {
		for _, m := range msgs {
			if m.Header.Level == syscall.SOL_SOCKET && m.Header.Type == soTimestampNS && len(m.Data) >= 16 {
				arrived = float64(int64(binary.LittleEndian.Uint64(m.Data[0:8]))) +
					float64(int64(binary.LittleEndian.Uint64(m.Data[8:16])))/1e9
			}
		}
	}
	data := append(c.tail, b[:n]...)
	c.mu.Lock()
	lat, end := latencies(data, arrived, c.lat)
	c.lat = lat
	c.mu.Unlock()
	rest := data[end:]
	if len(rest) > 64 {
		rest = rest[len(rest)-64:]
	}
	c.tail = append(c.tail[:0:0], rest...)
	return n, nil
}

// dialStamped dials addr with SO_TIMESTAMPNS on, its reads stamped (stampedConn), and adds it to conns.
func dialStamped(ctx context.Context, addr string, conns *[]*stampedConn, mu *sync.Mutex) (net.Conn, error) {
	dialer := net.Dialer{Control: func(network, address string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, soTimestampNS, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	c, err := dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	tc := c.(*net.TCPConn)
	raw, err := tc.SyscallConn()
	if err != nil {
		c.Close()
		return nil, err
	}
	sc := &stampedConn{TCPConn: tc, raw: raw, oob: make([]byte, syscall.CmsgSpace(16))}
	mu.Lock()
	*conns = append(*conns, sc)
	mu.Unlock()
	return sc, nil
}

// cpuSeconds is the CPU time (user + system) this process has used so far.
func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "proxy gRPC address")
	streams := flag.Int("streams", 1000, "streams")
	perConn := flag.Int("per-conn", 1, "streams per connection")
	seconds := flag.Float64("seconds", 10, "seconds to read")
	sample := flag.Int("sample", 50, "streams recording latencies")
	topic := flag.String("topic", "bench", "topic")
	flag.Parse()

	var events, ended int64
	var mu sync.Mutex
	var lat []float64
	var stamped []*stampedConn
	ctx, cancel := context.WithCancel(context.Background())
	opened := make(chan error, *streams)
	var readers sync.WaitGroup
	req := request(*topic)
	var conn *grpc.ClientConn
	for k := 0; k < *streams; k++ {
		if k%*perConn == 0 {
			var err error
			options := []grpc.DialOption{grpc.WithInsecure(), grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{}))}
			if k < *sample { // its reads stamped at the socket: every stream on it is sampled there
				options = append(options, grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) {
					return dialStamped(ctx, a, &stamped, &mu)
				}))
			}
			conn, err = grpc.Dial(*addr, options...)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			defer conn.Close()
		}
		record := k < *sample
		readers.Add(1)
		go func(conn *grpc.ClientConn) {
			defer readers.Done()
			desc := &grpc.StreamDesc{StreamName: "Events", ServerStreams: true, ClientStreams: true}
			stream, err := conn.NewStream(ctx, desc, "/proto.StreamService/Events")
			if err == nil {
				err = stream.SendMsg(&req)
			}
			opened <- err
			if err != nil {
				return
			}
			var msg []byte
			var mine []float64
			for {
				if err := stream.RecvMsg(&msg); err != nil {
					if ctx.Err() == nil {
						atomic.AddInt64(&ended, 1)
					}
					break
				}
				atomic.AddInt64(&events, 1)
				if record {
					mine, _ = latencies(msg, float64(time.Now().UnixNano())/1e9, mine)
				}
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}(conn)
	}
	for k := 0; k < *streams; k++ {
		if err := <-opened; err != nil {
			fmt.Fprintln(os.Stderr, "stream:", err)
			os.Exit(1)
		}
	}
	out := json.NewEncoder(os.Stdout)
	out.Encode(map[string]int{"connected": *streams})
	cpu0 := cpuSeconds()
	time.Sleep(time.Duration(*seconds * float64(time.Second)))
	total := atomic.LoadInt64(&events)
	cpu := cpuSeconds() - cpu0
	arrived := []float64{}
	mu.Lock()
	for _, c := range stamped { // (what came after the reading window is left out, as for `events`)
		c.mu.Lock()
		arrived = append(arrived, c.lat...)
		c.mu.Unlock()
	}
	mu.Unlock()
	cancel()
	readers.Wait()
	if lat == nil {
		lat = []float64{}
	}
	out.Encode(map[string]interface{}{"result": map[string]interface{}{
		"events": total, "latencies": arrived, "read_latencies": lat, "streams_ended": atomic.LoadInt64(&ended),
		"cpu_seconds": cpu, "read_seconds": *seconds}})
}
