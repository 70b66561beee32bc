// vmr-vcsim: the vmrestore lab's vCenter, built on govmomi's simulator package.
//
// It builds the lab's inventory (one datacenter, one cluster of N ESXi hosts,
// three datastores backed by real local directories plus any -ds NAME=DIR, two
// networks, the HotAdd proxy VMs), serves the vSphere API on 127.0.0.1 with the given credentials,
// writes a JSON description of what it built to -info once it is ready, and
// runs until SIGTERM/SIGINT. The Python side (vmrestore.lab.lab) starts it;
// this file is package data, built once and cached by vmrestore.lab.build.
//
// With -tls-cert/-tls-key it serves https with that certificate (the lab makes
// a CA and signs it). With -esx it is a standalone ESXi host instead of a
// vCenter (govmomi's ESX model: one host in "ha-datacenter", no cluster, no
// vCenter-only services), with the same datastores, networks and proxies.
//
// Why a Go main of our own instead of the stock vcsim command: the stock one
// cannot give a datastore the VVOL type nor back datastores by chosen
// directories, and Debian ships the simulator package but not the command.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"log"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// infoVersion is bumped when the -info JSON changes incompatibly.
const infoVersion = 1

type dsInfo struct {
	Name  string `json:"name"`
	Type  string `json:"type"`
	Dir   string `json:"dir"`
	Moref string `json:"moref"`
}

type labInfo struct {
	Version    int      `json:"version"`
	URL        string   `json:"url"`
	Datacenter string   `json:"datacenter"`
	Cluster    string   `json:"cluster"`
	Hosts      []string `json:"hosts"`
	Pool       string   `json:"resource_pool"`
	VMFolder   string   `json:"vm_folder"`
	Datastores []dsInfo `json:"datastores"`
	Networks   []string `json:"networks"`
	ProxyVM    string   `json:"proxy_vm"`
	ProxyMoref string   `json:"proxy_moref"`
	ProxyVMs   []string `json:"proxy_vms"`
	Pid        int      `json:"pid"`
}

type dsSpec struct {
	name, typ, dir string
}

// dsFlags collects repeated -ds NAME=DIR flags: more local datastores (type VMFS).
type dsFlags []dsSpec

func (f *dsFlags) String() string { return fmt.Sprint(len(*f)) }

func (f *dsFlags) Set(v string) error {
	i := strings.Index(v, "=")
	if i <= 0 || i == len(v)-1 {
		return fmt.Errorf("want NAME=DIR, got %q", v)
	}
	*f = append(*f, dsSpec{v[:i], "VMFS", v[i+1:]})
	return nil
}

// proxyNames: the first proxy keeps its name, the others get a number (vmr-proxy2, ...).
func proxyNames(first string, n int) []string {
	if first == "" || n < 1 {
		return nil
	}
	names := []string{first}
	for i := 2; i <= n; i++ {
		names = append(names, fmt.Sprintf("%s%d", first, i))
	}
	return names
}

func fatal(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "vmr-vcsim: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve the vSphere API on (port 0: pick a free one)")
	user := flag.String("user", "vmr", "login user name")
	pwFile := flag.String("password-file", "", "file holding the login password (required)")
	nhosts := flag.Int("hosts", 2, "ESXi hosts in the cluster")
	dsLocal := flag.String("ds-local", "", "directory backing datastore ds-local (required)")
	dsSan := flag.String("ds-san", "", "directory backing datastore ds-san (the SAN LUN's mount point)")
	dsVvol := flag.String("ds-vvol", "", "directory backing datastore ds-vvol (type VVOL)")
	proxy := flag.String("proxy", "vmr-proxy", "name of the HotAdd proxy VM (empty: none)")
	nproxies := flag.Int("proxies", 1, "proxy VMs: NAME, NAME2, NAME3, ... (one per host, round robin)")
	var extra dsFlags
	flag.Var(&extra, "ds", "another local datastore NAME=DIR (type VMFS; repeatable)")
	infoPath := flag.String("info", "", "write the lab description JSON here when ready")
	tlsCert := flag.String("tls-cert", "", "serve https with this PEM certificate (chain)")
	tlsKey := flag.String("tls-key", "", "the certificate's PEM private key")
	esxMode := flag.Bool("esx", false, "a standalone ESXi host instead of a vCenter")
	flag.Parse()

	if *pwFile == "" || *dsLocal == "" {
		fatal("-password-file and -ds-local are required")
	}
	pwBytes, err := ioutil.ReadFile(*pwFile)
	if err != nil {
		fatal("reading password: %v", err)
	}
	password := strings.TrimSpace(string(pwBytes))
	if password == "" {
		fatal("empty password in %s", *pwFile)
	}

	// A vCenter with one datacenter and one cluster (or, -esx, one standalone
	// host); no default datastores, VMs or distributed port groups: the lab
	// adds its own below.
	var m *simulator.Model
	if *esxMode {
		m = simulator.ESX()
	} else {
		m = simulator.VPX()
		m.Datacenter = 1
		m.Cluster = 1
		m.ClusterHost = *nhosts
		m.Host = 0
		m.Portgroup = 0
	}
	m.Datastore = 0
	m.Machine = 0
	m.Autostart = false
	if err := m.Create(); err != nil {
		fatal("creating the inventory: %v", err)
	}
	defer m.Remove()

	if *tlsCert != "" {
		cert, err := tls.LoadX509KeyPair(*tlsCert, *tlsKey)
		if err != nil {
			fatal("loading the TLS certificate: %v", err)
		}
		m.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	m.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, password)}
	s := m.Service.NewServer()
	defer s.Close()

	ctx := context.Background()
	u := *s.URL
	u.User = url.UserPassword(*user, password)
	c, err := govmomi.NewClient(ctx, &u, true)
	if err != nil {
		fatal("connecting to our own server: %v", err)
	}

	specs := []dsSpec{{"ds-local", "VMFS", *dsLocal}}
	if *dsSan != "" {
		specs = append(specs, dsSpec{"ds-san", "VMFS", *dsSan})
	}
	if *dsVvol != "" {
		specs = append(specs, dsSpec{"ds-vvol", "VVOL", *dsVvol})
	}
	specs = append(specs, extra...)
	info, err := build(ctx, c, specs, proxyNames(*proxy, *nproxies), *esxMode)
	if err != nil {
		fatal("building the lab inventory: %v", err)
	}
	// s.URL is the service's Listen URL, whose User is what logins are checked
	// against: print a copy without it.
	pub := *s.URL
	pub.User = nil
	info.URL = pub.String()
	info.Pid = os.Getpid()

	if *infoPath != "" {
		data, _ := json.MarshalIndent(info, "", "  ")
		tmp := *infoPath + ".tmp"
		if err := ioutil.WriteFile(tmp, append(data, '\n'), 0600); err != nil {
			fatal("writing %s: %v", tmp, err)
		}
		if err := os.Rename(tmp, *infoPath); err != nil {
			fatal("renaming %s: %v", tmp, err)
		}
	}
	log.Printf("vmr-vcsim ready at %s", info.URL)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	log.Printf("vmr-vcsim stopping")
	_ = c.Logout(ctx)
}

func build(ctx context.Context, c *govmomi.Client, specs []dsSpec, proxies []string,
	esxMode bool) (*labInfo, error) {
	finder := find.NewFinder(c.Client, true)
	dc, err := finder.DefaultDatacenter(ctx)
	if err != nil {
		return nil, err
	}
	finder.SetDatacenter(dc)
	folders, err := dc.Folders(ctx)
	if err != nil {
		return nil, err
	}
	info := &labInfo{
		Version:    infoVersion,
		Datacenter: dc.Name(),
		VMFolder:   folders.VmFolder.InventoryPath,
	}
	var hosts []*object.HostSystem
	var pool *object.ResourcePool
	if esxMode { // one host, its own compute resource and pool; no cluster
		host, err := finder.DefaultHostSystem(ctx)
		if err != nil {
			return nil, err
		}
		hosts = []*object.HostSystem{host}
		if pool, err = finder.DefaultResourcePool(ctx); err != nil {
			return nil, err
		}
		info.Pool = pool.InventoryPath
	} else {
		cluster, err := finder.DefaultClusterComputeResource(ctx)
		if err != nil {
			return nil, err
		}
		if hosts, err = cluster.Hosts(ctx); err != nil {
			return nil, err
		}
		if pool, err = cluster.ResourcePool(ctx); err != nil {
			return nil, err
		}
		info.Cluster = cluster.Name()
		info.Pool = cluster.InventoryPath + "/Resources"
	}
	for _, h := range hosts {
		info.Hosts = append(info.Hosts, h.Name())
	}

	// Datastores: each mounted on every host, backed by a real directory.
	for _, spec := range specs {
		var ref types.ManagedObjectReference
		for _, h := range hosts {
			dss, err := h.ConfigManager().DatastoreSystem(ctx)
			if err != nil {
				return nil, err
			}
			ds, err := dss.CreateLocalDatastore(ctx, spec.name, spec.dir)
			if err != nil {
				return nil, fmt.Errorf("datastore %s on %s: %v", spec.name, h.Name(), err)
			}
			ref = ds.Reference()
		}
		// The simulator calls every local datastore "OTHER"; give it the
		// type a real host would report, on the simulator's own object.
		// Each host's CreateLocalDatastore replaces the object, so the last
		// one only lists its own host: list every host as a mount.
		sds := simulator.Map.Get(ref).(*simulator.Datastore)
		simulator.Map.WithLock(sds, func() {
			sds.Summary.Type = spec.typ
			sds.Host = nil
			for _, h := range hosts {
				sds.Host = append(sds.Host, types.DatastoreHostMount{
					Key: h.Reference(),
					MountInfo: types.HostMountInfo{
						Path:       spec.dir,
						AccessMode: string(types.HostMountModeReadWrite),
						Mounted:    types.NewBool(true),
						Accessible: types.NewBool(true),
					},
				})
			}
		})
		info.Datastores = append(info.Datastores, dsInfo{spec.name, spec.typ, spec.dir, ref.Value})
	}

	if esxMode {
		dropStaleDatastores(dc.Reference(), hosts)
	}

	// Networks: the simulator's "VM Network" plus "Restore Network" (the
	// target of --network-map tests), a port group present on every host.
	if err := addNetwork(ctx, finder, hosts, "Restore Network"); err != nil {
		return nil, err
	}
	if err := attachNetwork(ctx, finder, hosts, "VM Network"); err != nil {
		return nil, err
	}
	nets, err := finder.NetworkList(ctx, "*")
	if err != nil {
		return nil, err
	}
	for _, n := range nets {
		info.Networks = append(info.Networks, n.GetInventoryPath()[strings.LastIndex(n.GetInventoryPath(), "/")+1:])
	}

	for i, name := range proxies {
		ref, err := createProxy(ctx, c, finder, folders, pool, hosts[i%len(hosts)], name)
		if err != nil {
			return nil, fmt.Errorf("proxy VM %s: %v", name, err)
		}
		if i == 0 {
			info.ProxyVM = name
			info.ProxyMoref = ref.Value
		}
		info.ProxyVMs = append(info.ProxyVMs, name)
	}
	return info, nil
}

// dropStaleDatastores: govmomi's ESX model lists its default datastore in the
// datacenter and the host even when the model creates none (Datastore = 0);
// a client walking dc.datastore would meet a deleted object. Keep live ones.
func dropStaleDatastores(dcRef types.ManagedObjectReference, hosts []*object.HostSystem) {
	live := func(refs []types.ManagedObjectReference) []types.ManagedObjectReference {
		var keep []types.ManagedObjectReference
		for _, r := range refs {
			if simulator.Map.Get(r) != nil {
				keep = append(keep, r)
			}
		}
		return keep
	}
	sdc := simulator.Map.Get(dcRef).(*simulator.Datacenter)
	simulator.Map.WithLock(sdc, func() { sdc.Datastore = live(sdc.Datastore) })
	for _, h := range hosts {
		sh := simulator.Map.Get(h.Reference()).(*simulator.HostSystem)
		simulator.Map.WithLock(sh, func() { sh.Datastore = live(sh.Datastore) })
	}
}

// addNetwork adds a standard port group on the first host through the API,
// then attaches the resulting Network to the other hosts directly (the
// simulator refuses the same port group name twice in a datacenter).
func addNetwork(ctx context.Context, finder *find.Finder, hosts []*object.HostSystem, name string) error {
	ns, err := hosts[0].ConfigManager().NetworkSystem(ctx)
	if err != nil {
		return err
	}
	if err := ns.AddPortGroup(ctx, types.HostPortGroupSpec{Name: name, VswitchName: "vSwitch0"}); err != nil {
		return fmt.Errorf("adding network %s: %v", name, err)
	}
	return attachNetwork(ctx, finder, hosts, name)
}

// attachNetwork makes the named network list every host, and every host list it.
func attachNetwork(ctx context.Context, finder *find.Finder, hosts []*object.HostSystem, name string) error {
	n, err := finder.Network(ctx, name)
	if err != nil {
		return fmt.Errorf("network %s: %v", name, err)
	}
	netRef := n.Reference()
	net, ok := simulator.Map.Get(netRef).(*mo.Network)
	if !ok {
		return fmt.Errorf("network %s is not a standard network", name)
	}
	net.Host = nil
	for _, h := range hosts {
		sh := simulator.Map.Get(h.Reference()).(*simulator.HostSystem)
		has := false
		for _, ref := range sh.Network {
			if ref == netRef {
				has = true
			}
		}
		if !has {
			sh.Network = append(sh.Network, netRef)
		}
		net.Host = append(net.Host, h.Reference())
	}
	return nil
}

// createProxy creates the HotAdd proxy VM on ds-local: a paravirtual SCSI
// controller with a small boot disk at unit 0 (hot-added disks take the next
// free units) and a NIC on "VM Network"; powered on, as a running proxy is.
func createProxy(ctx context.Context, c *govmomi.Client, finder *find.Finder, folders *object.DatacenterFolders,
	pool *object.ResourcePool, host *object.HostSystem, name string) (types.ManagedObjectReference, error) {
	var devices object.VirtualDeviceList
	scsi, err := devices.CreateSCSIController("pvscsi")
	if err != nil {
		return types.ManagedObjectReference{}, err
	}
	devices = append(devices, scsi)
	disk := devices.CreateDisk(scsi.(types.BaseVirtualController), types.ManagedObjectReference{},
		fmt.Sprintf("[ds-local] %s/%s.vmdk", name, name))
	disk.CapacityInKB = 16 * 1024
	disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo).ThinProvisioned = types.NewBool(true)
	devices = append(devices, disk)

	network, err := finder.Network(ctx, "VM Network")
	if err != nil {
		return types.ManagedObjectReference{}, err
	}
	backing, err := network.EthernetCardBackingInfo(ctx)
	if err != nil {
		return types.ManagedObjectReference{}, err
	}
	nic, err := devices.CreateEthernetCard("vmxnet3", backing)
	if err != nil {
		return types.ManagedObjectReference{}, err
	}
	devices = append(devices, nic)

	spec := types.VirtualMachineConfigSpec{
		Name:     name,
		GuestId:  string(types.VirtualMachineGuestOsIdentifierOtherLinux64Guest),
		NumCPUs:  2,
		MemoryMB: 2048,
		Files:    &types.VirtualMachineFileInfo{VmPathName: "[ds-local]"},
	}
	spec.DeviceChange, err = devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
	if err != nil {
		return types.ManagedObjectReference{}, err
	}
	// The boot disk file is created with the VM.
	for _, ch := range spec.DeviceChange {
		if _, ok := ch.GetVirtualDeviceConfigSpec().Device.(*types.VirtualDisk); ok {
			ch.GetVirtualDeviceConfigSpec().FileOperation = types.VirtualDeviceConfigSpecFileOperationCreate
		}
	}
	task, err := folders.VmFolder.CreateVM(ctx, spec, pool, host)
	if err != nil {
		return types.ManagedObjectReference{}, err
	}
	res, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return types.ManagedObjectReference{}, err
	}
	ref := res.Result.(types.ManagedObjectReference)
	vm := object.NewVirtualMachine(c.Client, ref)
	ptask, err := vm.PowerOn(ctx)
	if err != nil {
		return ref, err
	}
	if err := ptask.Wait(ctx); err != nil {
		return ref, err
	}
	return ref, nil
}
