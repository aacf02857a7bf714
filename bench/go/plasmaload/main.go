// plasmaload: plasma's `proto.StreamService/Events` read by grpc-go, as plasma's Go users have it,
// for bench/dataplane.py (`--client go`). Messages are passed as raw bytes (a codec named "proto"),
// so the figures are grpc-go's transport (HTTP/2, flow control, BDP windows), not protobuf decoding.
//
// It opens -streams streams, -per-conn on each connection, subscribes each to -topic, prints
// {"connected": N} once every stream is open, reads for -seconds, and prints
// {"result": {"events": .., "latencies": [..], "streams_ended": .., "cpu_seconds": .., "read_seconds": ..}}:
// latencies (seconds) from the `"ts":T,` stamps in events on the first -sample streams, as the Python
// roles do, and the CPU seconds the client spent over its -seconds of reading.
//
// Build offline with Debian's packages (golang-go, golang-google-grpc-dev):
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build -o plasmaload .
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
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

// latencies appends now - T for every `"ts":T,` in data.
func latencies(data []byte, now float64, out []float64) []float64 {
	for {
		i := bytes.Index(data, stamp)
		if i < 0 {
			return out
		}
		data = data[i+len(stamp):]
		j := bytes.IndexByte(data, ',')
		if j < 0 {
			return out
		}
		if ts, err := strconv.ParseFloat(string(data[:j]), 64); err == nil {
			out = append(out, now-ts)
		}
		data = data[j:]
	}
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
	ctx, cancel := context.WithCancel(context.Background())
	opened := make(chan error, *streams)
	var readers sync.WaitGroup
	req := request(*topic)
	var conn *grpc.ClientConn
	for k := 0; k < *streams; k++ {
		if k%*perConn == 0 {
			var err error
			conn, err = grpc.Dial(*addr, grpc.WithInsecure(), grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
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
					mine = latencies(msg, float64(time.Now().UnixNano())/1e9, mine)
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
	cancel()
	readers.Wait()
	if lat == nil {
		lat = []float64{}
	}
	out.Encode(map[string]interface{}{"result": map[string]interface{}{
		"events": total, "latencies": lat, "streams_ended": atomic.LoadInt64(&ended), "cpu_seconds": cpu,
		"read_seconds": *seconds}})
}
