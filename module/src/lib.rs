use core::ffi::{c_char, c_void};
use core::ptr;
use ngx::core::Status;
use ngx::ffi::*;
use ngx::http::{HttpModule, HttpModuleServerConf, Merge, MergeConfigError};
use ngx::{ngx_conf_log_error, ngx_string};

#[derive(Default)]
pub struct SrvConf { url: Option<String> }
impl Merge for SrvConf { fn merge(&mut self, _p: &Self) -> Result<(), MergeConfigError> { Ok(()) } }

struct Module;
impl HttpModule for Module {
    fn module() -> &'static ngx_module_t { unsafe { &*ptr::addr_of!(ngx_http_upsync_module) } }
}
unsafe impl HttpModuleServerConf for Module { type ServerConf = SrvConf; }

static CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: None, postconfiguration: None,
    create_main_conf: None, init_main_conf: None,
    create_srv_conf: Some(Module::create_srv_conf), merge_srv_conf: Some(Module::merge_srv_conf),
    create_loc_conf: None, merge_loc_conf: None,
};
static mut COMMANDS: [ngx_command_t; 2] = [
    ngx_command_t { name: ngx_string!("upsync"), type_: (NGX_HTTP_UPS_CONF | NGX_CONF_1MORE) as ngx_uint_t,
        set: Some(set_upsync), conf: NGX_HTTP_SRV_CONF_OFFSET, offset: 0, post: ptr::null_mut() },
    ngx_command_t::empty(),
];
ngx::ngx_modules!(ngx_http_upsync_module);
#[used]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_upsync_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of!(CTX) as _, commands: unsafe { ptr::addr_of_mut!(COMMANDS[0]) },
    type_: NGX_HTTP_MODULE as _, ..ngx_module_t::default()
};
extern "C" fn set_upsync(cf: *mut ngx_conf_t, _cmd: *mut ngx_command_t, conf: *mut c_void) -> *mut c_char {
    let conf = unsafe { &mut *(conf as *mut SrvConf) };
    let args: &[ngx_str_t] = unsafe { (*(*cf).args).as_slice() };
    let url = args[1].to_string();
    if !url.contains('/') {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "upsync: \"{}\" has no path", url);
        return ngx::core::NGX_CONF_ERROR;
    }
    conf.url = Some(url);
    let _ = Status::NGX_OK;
    ngx::core::NGX_CONF_OK
}
